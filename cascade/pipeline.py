"""The funnel: retrieval -> early-stage rankers (ESR) -> late-stage ranker (LSR), with budgets.

A `Pipeline` owns the budgets (how many candidates each stage passes on) and the top-k selection;
stages only retrieve or score (see `cascade.stages.base`). For one batch of requests retrieval
runs once and every ESR variant scores the same retrieved candidates, keeps its top `esr`, and
feeds them to the same LSR, which keeps the top `final`: two ESRs are compared on identical input.
Every stage's output is checked at the boundary (shape, ids in the catalogue, finite scores) so a
misbehaving stage fails with its own name, and every stage is timed with a monotonic clock
(`time.perf_counter_ns`, after synchronising the device on GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from cascade.data.dataset import DataError
from cascade.data.traffic import RequestBatch
from cascade.stages.base import Candidates, Ranker, Retriever, StageError, check_scores


@dataclass(frozen=True)
class Budgets:
    """How many candidates each stage passes on: retrieval -> esr -> final (the LSR's list)."""

    retrieval: int
    esr: int
    final: int = 10

    def __post_init__(self) -> None:
        for name in ("retrieval", "esr", "final"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"Budgets.{name} must be an integer, got {v!r}")
        if self.final < 1:
            raise ValueError(
                f"the final budget must be >= 1, got retrieval={self.retrieval}, "
                f"esr={self.esr}, final={self.final}"
            )
        if not self.retrieval > self.esr > self.final:
            raise ValueError(
                "budgets must shrink through the funnel (retrieval > esr > final), got "
                f"retrieval={self.retrieval}, esr={self.esr}, final={self.final}"
            )

    def check_catalogue(self, n_items: int) -> Budgets:
        if self.retrieval > n_items:
            raise ValueError(
                f"retrieval budget {self.retrieval} exceeds the catalogue of {n_items} items"
            )
        return self

    def as_dict(self) -> dict:
        return {"retrieval": self.retrieval, "esr": self.esr, "final": self.final}

    def describe(self) -> str:
        return f"retrieval {self.retrieval} -> esr {self.esr} -> final {self.final}"


def _round_nice(x: float) -> int:
    """Round to a multiple of 10 from 100 up, of 5 below (budgets people can read)."""
    step = 10 if x >= 100 else 5 if x >= 10 else 1
    return max(1, round(x / step) * step)


DEFAULT_ESR_SHARE = 0.25


def check_esr_share(esr_share: object) -> None:
    """Raise ValueError unless `esr_share` is a number in (0, 1)."""
    ok = isinstance(esr_share, (int, float)) and not isinstance(esr_share, bool)
    if not (ok and 0.0 < esr_share < 1.0):
        raise ValueError(f"budgets.esr_share must be a number in (0, 1), got {esr_share!r}")


def default_budgets(n_items: int, *, final: int = 10, esr_share: float = DEFAULT_ESR_SHARE) -> Budgets:
    """Budgets under which every stage matters: retrieval passes on about 15% of the catalogue
    (between 50 and 1000 items, never more than half of a small catalogue), the ESR `esr_share`
    of that (a quarter by default; at least 2 x final), the LSR `final`."""
    return resolve_budgets(n_items, final=final, esr_share=esr_share)


def resolve_budgets(
    n_items: int, *, retrieval: int | None = None, esr: int | None = None, final: int | None = None,
    esr_share: float = DEFAULT_ESR_SHARE,
) -> Budgets:
    """Budgets with the given values and the defaults of `default_budgets` for the rest, checked
    against the catalogue. A default never contradicts a given value (e.g. an explicit esr
    budget above the default retrieval one raises retrieval to esr / esr_share)."""
    check_esr_share(esr_share)
    final = 10 if final is None else final
    r = retrieval
    if r is None:
        r = min(max(_round_nice(0.15 * n_items), 50), 1000, n_items // 2)
        if esr is not None and r <= esr:
            r = min(n_items, math.ceil(esr / esr_share))
    e = esr if esr is not None else min(max(_round_nice(r * esr_share), 2 * final), r - 1)
    try:
        return Budgets(retrieval=r, esr=e, final=final).check_catalogue(n_items)
    except ValueError as err:
        if retrieval is not None and esr is not None:
            raise
        raise ValueError(
            f"{err} (defaults filled in for a catalogue of {n_items} items; give "
            "--retrieval-k/--esr-k/--final-k explicitly)"
        ) from None


@dataclass(frozen=True)
class VariantOutput:
    esr_ids: Tensor  # (B, K_esr) int64, the ESR's selection, best first
    final_ids: Tensor  # (B, K_final) int64, the LSR's selection, best first
    esr_ns: int  # ESR scoring + top-k selection
    lsr_ns: int  # LSR scoring + top-k selection


@dataclass(frozen=True)
class FunnelOutput:
    retrieved: Tensor  # (B, K_retrieval) int64, best first
    retrieval_ns: int
    variants: dict[str, VariantOutput]
    oracle_ids: Tensor | None = None  # (B', K_final): the LSR's top final over ALL retrieved,
    # for the batch's oracle rows (all B rows unless `run_batch` was given `oracle_rows`)
    oracle_ns: int = 0


def stage_label(stage: object) -> str:
    return str(getattr(stage, "name", None) or type(stage).__name__)


def stage_who(kind: str, stage: object, label: str | None = None) -> str:
    """How errors name a stage: "esr stage 'gesr'", with the variant label when it differs."""
    name = stage_label(stage)
    if label is None or label == name:
        return f"{kind} stage {name!r}"
    return f"{kind} stage {label!r} ({name})"


def call_stage(stage: object, who: str, method: str, *args: object) -> object:
    """`stage.method(*args)`, with any exception but our own errors reported as the stage's:
    `who` (its kind and name) and the method that raised. A `sys.exit` inside a stage is an
    error too: a plugin must never end a run silently."""
    try:
        return getattr(stage, method)(*args)
    except (StageError, DataError, KeyboardInterrupt):
        raise
    except SystemExit as e:
        raise StageError(f"{who} called sys.exit({e.code!r}) in {method}()") from None
    except Exception as e:  # noqa: BLE001 - the stage's own failure, named as such
        raise StageError(f"{who} raised {type(e).__name__} in {method}(): {e}") from e


class Pipeline:
    """retriever -> each ESR in `esrs` (label -> ranker) -> lsr, under `budgets`."""

    def __init__(
        self,
        retriever: Retriever,
        esrs: Mapping[str, Ranker],
        lsr: Ranker,
        budgets: Budgets,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        if not esrs:
            raise ValueError("Pipeline needs at least one ESR variant")
        self.retriever = retriever
        self.esrs = dict(esrs)
        self.lsr = lsr
        self.budgets = budgets
        self.device = torch.device(device)
        self._sync = self.device.type == "cuda"

    def _now(self) -> int:
        if self._sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter_ns()

    def _retrieve(self, batch: RequestBatch, n_items: int | None) -> Tensor:
        name = f"retrieval {stage_label(self.retriever)}"
        who = stage_who("retrieval", self.retriever)
        out = call_stage(self.retriever, who, "retrieve", batch,
                         self.budgets.retrieval)
        ids = out.ids if isinstance(out, Candidates) else out
        if not isinstance(ids, Tensor):
            raise StageError(f"stage {name!r} returned {type(out).__name__}, expected Candidates")
        shape = (len(batch), self.budgets.retrieval)
        if tuple(ids.shape) != shape:
            raise StageError(f"stage {name!r} returned ids of shape {tuple(ids.shape)}, expected {shape}")
        if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
            raise StageError(f"stage {name!r} returned {ids.dtype} ids, expected int64")
        if ids.device.type == "meta":
            raise StageError(f"stage {name!r} returned ids on the 'meta' device (no values), "
                             f"expected a tensor holding item ids")
        # -1 pads a row when fewer unseen items than the budget exist at all
        bad = (ids < -1) | (ids >= n_items) if n_items is not None else ids < -1
        if bool(bad.any()):
            raise StageError(
                f"stage {name!r} returned {int(bad.sum())} ids outside the catalogue [0, {n_items})"
            )
        ordered = ids.sort(dim=1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(dup.any()):
            row = int(dup.any(1).nonzero()[0, 0])
            item = int(ordered[row, 1:][dup[row]][0])
            raise StageError(
                f"stage {name!r} returned item {item} more than once for request {row} of the "
                f"batch ({int(dup.sum())} duplicate ids in all); a retriever must return distinct "
                "ids (pad with -1 when fewer exist)"
            )
        return ids.long()

    def _rank(self, kind: str, label: str, ranker: Ranker, batch: RequestBatch, cand: Tensor, k: int):
        """Score `cand` (B, K) with `ranker` and keep the top k ids, best first. Padding ids (-1)
        are scored as item 0 and then ranked last, so rankers only ever see real ids."""
        pad = cand < 0
        has_pad = bool(pad.any())
        scores = call_stage(ranker, stage_who(kind, ranker, label), "score", batch,
                            cand.clamp_min(0) if has_pad else cand)
        scores = check_scores(f"{kind} {label}", scores, tuple(cand.shape))
        if has_pad:
            scores = scores.masked_fill(pad, float("-inf"))
        idx = torch.topk(scores, k, dim=1, sorted=True).indices  # (B, k)
        return torch.gather(cand, 1, idx)

    @torch.no_grad()
    def run_batch(
        self, batch: RequestBatch, *, oracle: bool = False, n_items: int | None = None,
        oracle_rows: Tensor | None = None,
    ) -> FunnelOutput:
        """The funnel on one batch (already on the device). With `oracle`, the LSR also scores
        every retrieved candidate (what the funnel would give without the ESR's cut), for the
        rows `oracle_rows` (int64 indices into the batch) or for all rows when None."""
        b = self.budgets
        t0 = self._now()
        retrieved = self._retrieve(batch, n_items)
        t1 = self._now()
        variants = {}
        lsr_label = stage_label(self.lsr)
        for label, esr in self.esrs.items():
            t2 = self._now()
            esr_ids = self._rank("esr", label, esr, batch, retrieved, b.esr)
            t3 = self._now()
            final_ids = self._rank("lsr", lsr_label, self.lsr, batch, esr_ids, b.final)
            t4 = self._now()
            variants[label] = VariantOutput(esr_ids, final_ids, t3 - t2, t4 - t3)
        oracle_ids, oracle_ns = None, 0
        if oracle and (oracle_rows is None or len(oracle_rows)):
            sub, cand = batch, retrieved
            if oracle_rows is not None and len(oracle_rows) < len(batch):
                sub, cand = batch.select(oracle_rows), retrieved[oracle_rows]
            t5 = self._now()
            oracle_ids = self._rank("lsr", lsr_label, self.lsr, sub, cand, b.final)
            oracle_ns = self._now() - t5
        return FunnelOutput(retrieved, t1 - t0, variants, oracle_ids, oracle_ns)
