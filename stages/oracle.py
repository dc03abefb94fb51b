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
from typing import Any, ClassVar

import torch
from torch import Tensor

from cascade.data.traffic import RequestBatch
from cascade.stages.base import FitContext, StageError, check_fitted, register


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
    kind: ClassVar[str] = "ranker"
    config_class = OracleConfig
    candidate_independent: ClassVar[bool] = True  # the affinity of each (request, item) pair

    truth_ = None  # the dataset's GroundTruth
    fit_report_: dict[str, Any] | None = None
    device_: torch.device | None = None

    def __init__(self, config: OracleConfig | None = None) -> None:
        self.config = config or self.config_class()
        if not isinstance(self.config, OracleConfig):
            raise ValueError(f"config must be an OracleConfig, got {type(self.config).__name__}")

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
        self.truth_ = truth
        self.device_ = ctx.device
        self.fit_report_ = {"cached": False, "seconds": 0.0, "parts": list(self.config.parts)}
        return self

    @torch.no_grad()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """candidates (B, K) int64 -> (B, K) float32 ground-truth affinity."""
        check_fitted(self, self.kind, "truth_")
        c = candidates.to(self.device_)
        return self.truth_.affinity(batch, c, parts=self.config.parts).float()


@register("esr", "oracle-dot")
@register("lsr", "oracle-dot")
class OracleDotRanker(OracleRanker):
    """Scores candidates with the decoupled part of the ground truth only (what a two-tower
    model could express)."""

    name = "oracle-dot"
    config_class = OracleDotConfig
