"""Oracle rankers for synthetic data: score candidates with the generator's own ground truth.

The ceiling every learned ranker is measured against (see `cascade.data.synthetic`):
- `oracle` scores with the full affinity (parts "dot" + "cross": the latent dot product with the
  popularity bias, plus the category-count and repeat cross terms), the affinity the log was
  sampled from;
- `oracle-dot` scores with the decoupled part only ("dot"): the best any two-tower model could
  do, so `oracle` minus `oracle-dot` is how much a cross-aware ESR such as GESR can gain.
Both are registered as ESR and LSR. They learn nothing; `fit` only checks that the dataset
carries a ground truth (synthetic data) and keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from cascade.data.traffic import RequestBatch
from cascade.stages.base import FitContext, StageError, register
from cascade.stages.twotower import PAD_SCORE
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class OracleConfig:
    # which ground-truth parts to sum: "dot", "cross" (= "category" + "repeat"), "category",
    # "repeat" (see cascade.data.synthetic.GroundTruth.affinity)
    parts: tuple[str, ...] = ("dot", "cross")

    def __post_init__(self) -> None:
        from cascade.data.synthetic import TRUTH_PARTS

        parts = self.parts
        if isinstance(parts, str) or not isinstance(parts, (tuple, list)):
            raise ValueError(f"OracleConfig.parts must be a list of part names from "
                             f"{list(TRUTH_PARTS)}, got {parts!r}")
        object.__setattr__(self, "parts", tuple(parts))  # TOML gives a list
        bad = [p for p in self.parts if p not in TRUTH_PARTS]
        if bad or not self.parts or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"OracleConfig.parts must be distinct names from {list(TRUTH_PARTS)}, "
                             f"got {list(self.parts)}")
        if "cross" in self.parts and ({"category", "repeat"} & set(self.parts)):
            raise ValueError("OracleConfig.parts: 'cross' already includes 'category' and "
                             "'repeat'; give one or the other")


@dataclass(frozen=True, kw_only=True)
class OracleDotConfig(OracleConfig):
    parts: tuple[str, ...] = ("dot",)


@register("esr", "oracle")
@register("lsr", "oracle")
class OracleRanker:
    """Scores candidates with the synthetic ground-truth affinity (dot + cross by default)."""

    name = "oracle"
    config_class = OracleConfig

    def __init__(self, config: OracleConfig | None = None) -> None:
        self.config = config or self.config_class()
        if not isinstance(self.config, OracleConfig):
            raise ValueError(f"config must be an OracleConfig, got {type(self.config).__name__}")
        self.truth = None
        self.device = torch.device("cpu")
        self.report: dict = {}

    def fit(self, ctx: FitContext) -> OracleRanker:
        truth = getattr(ctx.dataset, "truth", None)
        if truth is None or not callable(getattr(truth, "affinity", None)):
            raise StageError(
                f"stage {self.name!r} needs a ground-truth affinity, which only synthetic data "
                f"has; dataset {ctx.dataset.name!r} ({ctx.dataset.source or 'no source'}) has "
                f"none. Use --data synthetic (or synthetic:<preset>), or another ranker."
            )
        n_truth = getattr(getattr(truth, "config", None), "n_items", ctx.dataset.n_items)
        if n_truth != ctx.dataset.n_items:
            raise StageError(
                f"stage {self.name!r}: the dataset's ground truth covers {n_truth} items but the "
                f"dataset has {ctx.dataset.n_items} (was the dataset filtered after generation?)"
            )
        self.truth = truth
        self.device = ctx.device
        self.report = {"cached": False, "seconds": 0.0, "parts": list(self.config.parts)}
        return self

    @torch.no_grad()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """candidates (B, K) int64 -> (B, K) float32 ground-truth affinity (-1 pads score
        PAD_SCORE)."""
        if self.truth is None:
            raise StageError(f"stage {self.name!r} is used before fit()")
        c = candidates.to(self.device)
        s = self.truth.affinity(batch, c.clamp_min(0), parts=self.config.parts)
        return s.masked_fill(c < 0, PAD_SCORE).float()


@register("esr", "oracle-dot")
@register("lsr", "oracle-dot")
class OracleDotRanker(OracleRanker):
    """Scores candidates with the decoupled part of the ground truth only (what a two-tower
    model could express)."""

    name = "oracle-dot"
    config_class = OracleDotConfig
