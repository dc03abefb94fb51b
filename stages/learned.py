"""The base of learned stages: a stage is its model plus how to train it; this class owns the
rest (the config, the seed, the checkpoint cache, the fit report, the "used before fit" error).

A learned stage declares
- `name`, `kind` ("retrieval", "esr", "lsr", or "ranker" for both rankers) and `config_class`
  (a frozen config dataclass, built with no arguments for the defaults);
- `serving_fields`: config fields that change only how the trained model is served (an index,
  a chunk size); they stay out of the checkpoint's cache key, so changing them reuses it;
- `cache_name` (optional): the checkpoint folder's prefix, `<kind>-<name>` by default;
- `float_linears` (optional): layers (names or shell-style patterns) that stay float32 when the
  config's `quantize` field, if it has one, is "int8" (see below);
and implements
- `build_model(ctx) -> nn.Module`: the untrained model (its initial weights are drawn right after
  `torch.manual_seed(ctx.seed)`, so they depend on the seed only, not on what ran before);
- `train_model(model, ctx) -> dict`: fit `model` in place (usually `training.fit_model`) and
  return a JSON-able report; not called when a cached checkpoint is loaded;
- `prepare_serving(model, ctx)` (optional): what serving needs from the trained model (item
  vectors, an index), run after training or loading alike;
- the serving methods (`score`, `retrieve`, ...), which start with `self.fitted_model()`.

A config with a `quantize` field (a serving field: "none" or "int8") has the trained model's
linear layers quantized to dynamic int8 after `prepare_serving` (`cascade.stages.quantize`: CPU
only, refused on another device before training). So what `prepare_serving` caches comes from the
float32 model, and the checkpoint `cached_fit` saved before is the float32 one.

`fit(ctx)` sets the learned state, scikit-learn style: `model_` (eval mode, on `device_`),
`fit_report_` (the training report with "cached", read by the engine) and `device_`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from cascade.stages.base import FitContext, check_fitted
from cascade.stages.quantize import check_device, quantize_linears
from cascade.stages.training import cached_fit
from cascade.util.tables import ConfigError, from_table


class LearnedStage:
    """Base of the learned stages (see the module docstring)."""

    name: ClassVar[str]
    kind: ClassVar[str]
    config_class: ClassVar[type]
    serving_fields: ClassVar[tuple[str, ...]] = ()
    cache_name: ClassVar[str | None] = None
    float_linears: ClassVar[tuple[str, ...]] = ()
    # a candidate's score never depends on the other candidates scored with it (checked by
    # `check_stage` when a stage claims it)
    candidate_independent: ClassVar[bool] = False

    model_: nn.Module | None = None
    fit_report_: Mapping[str, Any] | None = None
    device_: torch.device | None = None

    def __init__(self, config: Any = None) -> None:
        cc = self.config_class
        if config is None:
            config = cc()
        elif isinstance(config, Mapping):  # a TOML table: overrides of the defaults
            config = from_table(cc, config, f"{self.kind} stage {self.name!r} config")
        elif not isinstance(config, cc):
            raise ConfigError(
                f"{self.kind} stage {self.name!r}: config must be a {cc.__name__} or a table, "
                f"got {type(config).__name__}"
            )
        self.config = config

    def build_model(self, ctx: FitContext) -> nn.Module:
        raise NotImplementedError

    def train_model(self, model: nn.Module, ctx: FitContext) -> dict:
        raise NotImplementedError

    def prepare_serving(self, model: nn.Module, ctx: FitContext) -> None:
        """Build what serving needs from the trained `model` (default: nothing)."""

    def fit(self, ctx: FitContext) -> "LearnedStage":
        self.model_ = None  # a fit that fails leaves the stage unfitted, not half refitted
        quantize = getattr(self.config, "quantize", "none")
        field = f"{type(self.config).__name__}.quantize"
        check_device(quantize, ctx.device, field)  # before training, not after
        torch.manual_seed(ctx.seed)  # the initial weights depend on the seed only
        model = self.build_model(ctx).to(ctx.device)
        report = cached_fit(
            model,
            stage=self.cache_name or f"{self.kind}-{self.name}",
            config=self.config,
            ctx=ctx,
            train=lambda: self.train_model(model, ctx),
            serving=self.serving_fields,
        )
        model.eval()
        self.device_ = ctx.device
        self.prepare_serving(model, ctx)
        if quantize == "int8":
            quantize_linears(model, skip=self.float_linears, field=field)
            model.eval()  # lazily built caches (the LSR's item keys) restart from the int8 layers
        self.model_, self.fit_report_ = model, report
        return self

    def fitted_model(self) -> nn.Module:
        """`model_`, or `NotFittedError` before `fit`."""
        check_fitted(self, self.kind, "model_")
        return self.model_
