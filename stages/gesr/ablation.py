"""The rows of the GESR ablation (Hong et al., arXiv 2511.21095, the ablation table): the MoA
modules added one at a time on top of the two towers, as ESR variant tables (`StageSpec` form) of
one run. The engine's `cascade ablation` runs them; this file says what the rows are.

    two-tower            the two-tower ESR stage (`twotower`), the baseline
    gesr towers          GESR with every MoA module off: its own two towers (the primary logit)
    +HMA                 + Hard Matching Attention         (MoA embeddings fused without MLPG)
    +self-attn           + target-aware self attention
    +cross-attn          + NRO and RO cross attention
    +MLPG (full GESR)    + Multi-Logit Parameterized Gating: the full model
    full GESR, int8      the full model served with `quantize = "int8"` (dynamic int8 linear
                         layers, `cascade.stages.quantize`): a serving field, so the same
                         checkpoint as the row above, and its quality and latency beside it;
                         CPU runs only (int8 dynamic quantization has CPU kernels only)

On synthetic data with a ground truth, `oracle-dot` (the decoupled part of the truth: what a
two-tower model can express at best) and `oracle` (the full truth) bound what an ESR can gain.
"""

from __future__ import annotations

from typing import Any, Mapping

BASELINE = "two-tower"
OFF = {"hma": False, "self_attn": False, "cross_attn": [], "mlpg": False}
ROWS: tuple[tuple[str, dict], ...] = (
    ("gesr towers", OFF),
    ("+HMA", {**OFF, "hma": True}),
    ("+self-attn", {**OFF, "hma": True, "self_attn": True}),
    ("+cross-attn", {**OFF, "hma": True, "self_attn": True, "cross_attn": ["nro", "ro"]}),
    ("+MLPG (full GESR)", {"hma": True, "self_attn": True, "cross_attn": ["nro", "ro"], "mlpg": True}),
)
FULL = ROWS[-1][1]
# rows serving a trained row's checkpoint differently: (label, moa switches, serving fields)
SERVING_ROWS: tuple[tuple[str, dict, dict], ...] = (
    ("full GESR, int8", FULL, {"quantize": "int8"}),
)
ORACLES = (("oracle-dot", "oracle-dot"), ("oracle", "oracle"))


def ablation_variants(
    gesr: Mapping[str, Any] | None = None,
    twotower: Mapping[str, Any] | None = None,
    *,
    oracles: bool = False,
    serving_rows: bool = True,
) -> list[dict]:
    """The ESR variants of the ablation (StageSpec tables), baseline first; `serving_rows`
    adds `SERVING_ROWS` (the int8 row: for a run on the CPU)."""
    gesr = dict(gesr or {})
    user_moa = gesr.pop("moa", {}) or {}
    rows = [{"stage": "twotower", "label": BASELINE, "baseline": True, "config": dict(twotower or {})}]
    for label, moa in ROWS:
        # the row's switches win over the user's moa table; its other keys (history_len, ...) stay
        rows.append({"stage": "gesr", "label": label, "config": {**gesr, "moa": {**user_moa, **moa}}})
    for label, moa, serving in SERVING_ROWS if serving_rows else ():  # after their trained row
        rows.append({"stage": "gesr", "label": label,
                     "config": {**gesr, **serving, "moa": {**user_moa, **moa}}})
    if oracles:
        rows += [{"stage": stage, "label": label} for label, stage in ORACLES]
    return rows
