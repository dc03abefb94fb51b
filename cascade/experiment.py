"""Experiments: a `RunConfig` (loadable from TOML) in, a trained, replayed, measured run out.

`run_experiment(cfg)` does, in this order:
1. resolve every stage (unknown names, plugins that do not import or lack a method, bad config
   keys all fail here, before any data is loaded);
2. load the data, split it, build the traffic (`prepare`);
3. resolve the budgets against the catalogue (bad budgets fail here, before any training);
4. fit retrieval, each ESR variant and the LSR (each stage caches its checkpoint through
   `stages.training.cached_fit`, so a second run loads instead of training);
5. replay the test traffic through the funnel (`cascade.replay`), optionally with the oracle pass;
6. compute the funnel metrics, the paired comparison of the primary ESR against the baseline,
   and the reference points (the LSR scoring the whole catalogue, most-popular);
7. write the run folder atomically (`cascade.records`).

An ablation is one run: `esr_variants` lists several ESRs (label, stage, config) that all see
the same retrieved candidates and feed the same LSR.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import tomllib
import torch

from cascade.data.dataset import Dataset
from cascade.data.splits import Split, SplitConfig, make_split, training_requests
from cascade.data.traffic import Traffic
from cascade.pipeline import (
    DEFAULT_ESR_SHARE, Budgets, Pipeline, check_esr_share, resolve_budgets, stage_label,
)
from cascade.stages.base import FitContext, StageError, resolve_stage_class

DEVICES = ("auto", "cpu", "cuda")
REPEAT_SHARE_FOR_EXCLUDE = 0.05  # exclude_seen "auto": exclude unless repeats are this common


def default_cache_dir() -> Path:
    """Where trained stages are cached: $CASCADE_CACHE_DIR or ~/.cache/cascade/models."""
    env = os.environ.get("CASCADE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cascade" / "models"


def _check_keys(d: Mapping[str, Any], allowed: typing.Iterable[str], where: str) -> None:
    allowed = list(allowed)
    for k in d:
        if k not in allowed:
            raise ValueError(f"{where}: unknown key {k!r}; allowed: {', '.join(allowed)}")


def _int(v: Any, where: str, *, minimum: int | None = None, optional: bool = False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {v}")


# ---- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """A stage by registered name or 'package.module:Class', with its config overrides.
    `label` names an ESR variant (default: the stage name); `baseline` marks the variant the
    others are compared against (only in `esr_variants`)."""

    stage: str
    config: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None
    baseline: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or not self.stage.strip():
            raise ValueError(f"stage spec must be a non-empty name or 'module:Class', got {self.stage!r}")
        if not isinstance(self.config, Mapping):
            raise ValueError(f"stage {self.stage!r}: config must be a table, got {self.config!r}")
        if self.label is not None and (not isinstance(self.label, str) or not self.label.strip()):
            raise ValueError(f"stage {self.stage!r}: label must be a non-empty string")

    @property
    def display(self) -> str:
        """The variant label: `label`, else the stage name ('module:Class' -> 'Class')."""
        return self.label or self.stage.rsplit(":", 1)[-1]

    @classmethod
    def parse(cls, value: Any, where: str) -> StageSpec:
        if isinstance(value, StageSpec):
            return value
        if isinstance(value, str):
            return cls(stage=value)
        if isinstance(value, Mapping):
            _check_keys(value, ("stage", "config", "label", "baseline"), where)
            if "stage" not in value:
                raise ValueError(f"{where}: missing key 'stage' (a stage name or 'module:Class')")
            try:
                return cls(**value)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        raise ValueError(f"{where} must be a stage name or a table with 'stage', got {value!r}")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"stage": self.stage}
        if self.label is not None:
            d["label"] = self.label
        if self.baseline:
            d["baseline"] = True
        if self.config:
            d["config"] = dict(self.config)
        return d


_TOP_KEYS = (
    "name", "data", "data_options", "split", "max_len", "retrieval", "esr", "esr_baseline",
    "esr_variants", "lsr", "budgets", "index", "exclude_seen", "device", "seed", "batch_size",
    "cache_dir", "retrain", "out", "oracle", "reference", "reference_requests", "warmup",
    "bootstrap",
)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one `cascade run` needs. Loadable from / saved as TOML (see `load`)."""

    name: str | None = None  # None: derived from data and ESR labels
    data: str = "synthetic"  # cascade.data.loaders spec: ml-100k, a path, synthetic[:preset]
    data_options: Mapping[str, Any] = field(default_factory=dict)  # loader keyword arguments
    split: SplitConfig = field(default_factory=SplitConfig)
    max_len: int = 50  # history events per request the stages see
    retrieval: StageSpec = field(default_factory=lambda: StageSpec(stage="twotower"))
    esr: StageSpec = field(default_factory=lambda: StageSpec(stage="twotower"))
    esr_baseline: StageSpec | None = None
    esr_variants: tuple[StageSpec, ...] = ()  # when given, replaces esr / esr_baseline
    lsr: StageSpec = field(default_factory=lambda: StageSpec(stage="lsr"))
    retrieval_k: int | None = None  # budgets; None: default for the catalogue
    esr_k: int | None = None
    final_k: int = 10
    # without esr_k: the ESR keeps this share of what retrieval passes on (0.25; the ablation
    # uses 0.1, a cut that binds, as in the paper's cascade of hundreds -> tens)
    esr_share: float = DEFAULT_ESR_SHARE
    index: str | None = None  # FAISS index_factory string for the retrieval stage
    exclude_seen: bool | None = None  # None: exclude unless the training log has repeats
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    batch_size: int = 256  # replay batch size
    cache_dir: str | None = None  # None: $CASCADE_CACHE_DIR or ~/.cache/cascade/models
    retrain: bool = False
    out: str | None = None  # None: runs/<YYYYmmdd-HHMMSS>-<name>
    oracle: bool = True  # the LSR also scores every retrieved candidate (funnel loss)
    reference: bool = True  # LSR over the full catalogue and most-popular reference points
    # test requests the full-catalogue reference scores (evenly spaced). Scoring
    # every item with the LSR costs n_items / retrieval_k times the funnel's LSR pass, so by
    # default it runs on a subsample; the funnel's share of it is taken on the same requests.
    # 0: every test request.
    reference_requests: int = 500
    warmup: int = 1  # untimed replay batches before timing
    bootstrap: int = 1000  # paired bootstrap resamples

    def __post_init__(self) -> None:
        if self.name is not None and (
            not isinstance(self.name, str) or not self.name.strip() or "/" in self.name
        ):
            raise ValueError(f"RunConfig.name must be a non-empty name without '/', got {self.name!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"RunConfig.data must be a dataset name or path, got {self.data!r}")
        if not isinstance(self.split, SplitConfig):
            raise ValueError("RunConfig.split must be a SplitConfig")
        _int(self.max_len, "RunConfig.max_len", minimum=1)
        _int(self.seed, "RunConfig.seed", minimum=0)
        _int(self.batch_size, "RunConfig.batch_size", minimum=1)
        _int(self.warmup, "RunConfig.warmup", minimum=0)
        _int(self.bootstrap, "RunConfig.bootstrap", minimum=10)
        _int(self.retrieval_k, "budgets.retrieval", minimum=2, optional=True)
        _int(self.esr_k, "budgets.esr", minimum=2, optional=True)
        _int(self.final_k, "budgets.final", minimum=1)
        _int(self.reference_requests, "RunConfig.reference_requests", minimum=0)
        check_esr_share(self.esr_share)
        ks = [(n, v) for n, v in (("retrieval", self.retrieval_k), ("esr", self.esr_k),
                                  ("final", self.final_k)) if v is not None]
        for (_, v1), (_, v2) in itertools.pairwise(ks):
            if not v1 > v2:
                raise ValueError(
                    "budgets must shrink through the funnel (retrieval > esr > final), got "
                    + ", ".join(f"{n}={v}" for n, v in ks)
                )
        dev = self.device
        if not isinstance(dev, str) or not (dev in DEVICES or dev.startswith("cuda:")):
            raise ValueError(f"RunConfig.device must be one of {', '.join(DEVICES)} or cuda:N, got {dev!r}")
        for name in ("retrain", "oracle", "reference"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RunConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.exclude_seen is not None and not isinstance(self.exclude_seen, bool):
            raise ValueError(f"RunConfig.exclude_seen must be true, false or unset, got {self.exclude_seen!r}")
        if self.index is not None and (not isinstance(self.index, str) or not self.index.strip()):
            raise ValueError(f"RunConfig.index must be a FAISS index_factory string, got {self.index!r}")
        if self.esr_variants:
            labels = [v.display for v in self.esr_variants]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"esr_variants: duplicate label(s) {dup}; give each a distinct label")
            if sum(v.baseline for v in self.esr_variants) > 1:
                raise ValueError("esr_variants: at most one variant may set baseline = true")
            if all(v.baseline for v in self.esr_variants):
                raise ValueError("esr_variants: the baseline needs at least one other variant")

    # -- ESR variants --------------------------------------------------------------------------
    def variant_specs(self) -> tuple[dict[str, StageSpec], str, str | None]:
        """(label -> spec in display order, primary label, baseline label or None)."""
        if self.esr_variants:
            specs = {v.display: v for v in self.esr_variants}
            base = next((v.display for v in self.esr_variants if v.baseline), None)
            primary = next(v.display for v in self.esr_variants if not v.baseline)
            return specs, primary, base
        primary = self.esr.display
        specs = {primary: self.esr}
        if self.esr_baseline is None:
            return specs, primary, None
        base = self.esr_baseline.display
        if base == primary:
            base = f"{base}-baseline"
        specs[base] = self.esr_baseline
        return specs, primary, base

    def resolved_name(self, data_name: str | None = None) -> str:
        if self.name:
            return self.name
        _, primary, base = self.variant_specs()
        data = data_name or (Path(self.data).name if ("/" in self.data) else self.data)
        parts = [data.replace(":", "-"), primary.split(":")[-1]]
        if base:
            parts += ["vs", base.split(":")[-1]]
        return "-".join(parts).replace("/", "-")

    # -- TOML ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> RunConfig:
        _check_keys(d, _TOP_KEYS, where)
        kw: dict[str, Any] = {k: v for k, v in d.items() if k not in ("split", "budgets")}
        if "split" in d:
            sp = d["split"]
            if not isinstance(sp, Mapping):
                raise ValueError(f"{where}: split must be a table, got {sp!r}")
            allowed = [f.name for f in dataclasses.fields(SplitConfig)]
            _check_keys(sp, allowed, f"{where}: split")
            kw["split"] = SplitConfig(**sp)
        if "budgets" in d:
            b = d["budgets"]
            if not isinstance(b, Mapping):
                raise ValueError(f"{where}: budgets must be a table, got {b!r}")
            _check_keys(b, ("retrieval", "esr", "final", "esr_share"), f"{where}: budgets")
            for k, f in (("retrieval", "retrieval_k"), ("esr", "esr_k"), ("final", "final_k"),
                         ("esr_share", "esr_share")):
                if k in b:
                    kw[f] = b[k]
        for k in ("retrieval", "esr", "lsr", "esr_baseline"):
            if k in kw and kw[k] is not None:
                kw[k] = StageSpec.parse(kw[k], f"{where}: {k}")
        if "esr_variants" in kw:
            vs = kw["esr_variants"]
            if not isinstance(vs, (list, tuple)):
                raise ValueError(f"{where}: esr_variants must be an array of tables")
            kw["esr_variants"] = tuple(
                StageSpec.parse(v, f"{where}: esr_variants[{i}]") for i, v in enumerate(vs)
            )
        if "data_options" in kw and not isinstance(kw["data_options"], Mapping):
            raise ValueError(f"{where}: data_options must be a table")
        for k in ("cache_dir", "out"):
            if kw.get(k) is not None:
                kw[k] = str(kw[k])
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except OSError as e:
            raise ValueError(f"config file {p}: cannot read it ({e.strerror or e})") from None
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {p}: invalid TOML ({e})") from None
        return cls.from_dict(d, where=f"config file {p}")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "name": self.name,
            "data": self.data,
            "max_len": self.max_len,
            "index": self.index,
            "exclude_seen": self.exclude_seen,
            "device": self.device,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "cache_dir": self.cache_dir,
            "retrain": self.retrain,
            "out": self.out,
            "oracle": self.oracle,
            "reference": self.reference,
            "reference_requests": self.reference_requests,
            "warmup": self.warmup,
            "bootstrap": self.bootstrap,
            "data_options": dict(self.data_options) or None,
            "split": {k: v for k, v in dataclasses.asdict(self.split).items() if v is not None},
            "budgets": {"retrieval": self.retrieval_k, "esr": self.esr_k, "final": self.final_k,
                        "esr_share": self.esr_share},
            "retrieval": self.retrieval.to_dict(),
            "lsr": self.lsr.to_dict(),
        }
        if self.esr_variants:
            d["esr_variants"] = [v.to_dict() for v in self.esr_variants]
        else:
            d["esr"] = self.esr.to_dict()
            if self.esr_baseline is not None:
                d["esr_baseline"] = self.esr_baseline.to_dict()
        return d

    def to_toml(self) -> str:
        from cascade.records import dumps_toml

        return dumps_toml(self.to_dict())

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


# ---- stages --------------------------------------------------------------------------------------


def _nested(f: dataclasses.Field, hints: Mapping[str, Any]) -> tuple[type | None, Any]:
    """(dataclass type, default instance or None) of field `f` when it holds a dataclass
    (e.g. a nested TrainConfig)."""
    default = f.default
    if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return type(default), default
    t = hints.get(f.name)
    for cand in (t, *typing.get_args(t)):  # Dataclass or Optional[Dataclass]
        if isinstance(cand, type) and dataclasses.is_dataclass(cand):
            return cand, None
    return None, None


def build_config(
    cc: type, values: Mapping[str, Any], where: str, base: Any = None
) -> Any:
    """`cc(**values)` for a config dataclass. A table for a nested dataclass field (e.g. `train`)
    overrides that field's default instance, so `train = {epochs = 1}` keeps the stage's own
    other training defaults. Unknown keys raise a ValueError naming the key and the allowed
    fields. `base`: an instance whose values are the defaults."""
    if not dataclasses.is_dataclass(cc):
        try:
            return cc(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    try:
        hints = typing.get_type_hints(cc)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to defaults' types
        hints = {}
    fields = {f.name: f for f in dataclasses.fields(cc) if f.init}
    kw = {} if base is None else {k: getattr(base, k) for k in fields}
    for k, v in values.items():
        if k not in fields:
            raise ValueError(f"{where}: unknown key {k!r}; allowed: {', '.join(fields)}")
        if isinstance(v, Mapping):
            sub, default = _nested(fields[k], hints)
            if base is not None and dataclasses.is_dataclass(getattr(base, k, None)):
                sub, default = type(getattr(base, k)), getattr(base, k)
            if sub is not None:
                v = build_config(sub, v, f"{where}.{k}", default)
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    try:
        return cc(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def build_stage(kind: str, spec: StageSpec | str, config: Mapping[str, Any] | None = None) -> Any:
    """An unfitted stage: resolve `spec` (registered name, entry point or 'module:Class'), build
    its config dataclass from `config` (merged over the spec's own) and construct it."""
    spec = StageSpec.parse(spec, kind) if not isinstance(spec, StageSpec) else spec
    cls = resolve_stage_class(kind, spec.stage)
    values = {**dict(spec.config), **dict(config or {})}
    where = f"{kind} stage {spec.stage!r} config"
    cc = getattr(cls, "config_class", None)
    try:
        if cc is None:
            if values:
                raise ValueError(
                    f"{where}: {cls.__name__} has no config_class, so it takes no config "
                    f"(got {', '.join(values)})"
                )
            return cls()
        return cls(config=build_config(cc, values, where))
    except TypeError as e:
        raise StageError(
            f"{kind} stage {spec.stage!r} ({cls.__name__}) cannot be constructed: {e} "
            "(a stage must be constructible with no arguments, or with config=)"
        ) from None


def _config_fields(stage: Any) -> set[str]:
    cc = getattr(type(stage), "config_class", None)
    return {f.name for f in dataclasses.fields(cc)} if cc and dataclasses.is_dataclass(cc) else set()


def run_overrides(cfg: RunConfig, kind: str, spec: StageSpec, exclude_seen: bool) -> dict:
    """The run-level settings passed into a stage's config when its config class has those
    fields: `exclude_seen` (retrieval drops seen items; the LSR's validation ignores them, as the
    run's metrics do) and, for retrieval, `index`."""
    try:
        cc = getattr(resolve_stage_class(kind, spec.stage), "config_class", None)
    except StageError:
        return {}
    names = {f.name for f in dataclasses.fields(cc)} if cc and dataclasses.is_dataclass(cc) else set()
    out: dict[str, Any] = {}
    if kind == "retrieval" and "index" in names and cfg.index is not None:
        out["index"] = cfg.index
    if "exclude_seen" in names:
        given = spec.config.get("exclude_seen")
        if given is not None and cfg.exclude_seen is not None and given != cfg.exclude_seen:
            raise ValueError(
                f"exclude_seen is {cfg.exclude_seen} for the run but {given} in the {kind} "
                "stage's config; set it in one place"
            )
        out["exclude_seen"] = given if given is not None else exclude_seen
    return out


# ---- data ----------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use cpu or auto)")
    return torch.device(device)


class Prepared(NamedTuple):
    dataset: Dataset
    split: Split
    ctx: FitContext
    test: Traffic


def load_data(cfg: RunConfig) -> Dataset:
    from cascade.data.loaders import load_dataset

    return load_dataset(cfg.data, **dict(cfg.data_options))


def prepare(
    cfg: RunConfig, *, dataset: Dataset | None = None, progress: bool = True
) -> Prepared:
    """(dataset, split, FitContext, test traffic) for `cfg`; `dataset` skips loading."""
    ds = load_data(cfg) if dataset is None else dataset
    split = make_split(ds, cfg.split)
    ctx = FitContext(
        dataset=ds,
        split=split,
        train=Traffic(ds, training_requests(split), max_len=cfg.max_len),
        valid=Traffic(ds, split.valid, max_len=cfg.max_len),
        device=resolve_device(cfg.device),
        seed=cfg.seed,
        cache_dir=Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir(),
        retrain=cfg.retrain,
        progress=progress,
    )
    return Prepared(ds, split, ctx, Traffic(ds, split.test, max_len=cfg.max_len))


def prepare_context(cfg: RunConfig, *, dataset: Dataset | None = None) -> FitContext:
    return prepare(cfg, dataset=dataset).ctx


def repeat_share(split: Split) -> float:
    """Share of training events whose item the same user already had (repeat consumption)."""
    if split.train.height == 0:
        return 0.0
    return float(
        split.train.select((~pl.col("item").is_first_distinct().over("user")).mean()).item()
    )


def traffic_key(traffic: Traffic) -> str:
    """Hash of the replayed request ids, users and targets: equal keys = same traffic."""
    h = hashlib.sha256()
    for arr in (traffic.request_id, traffic.user, traffic.targets):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ---- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    config: RunConfig  # resolved: budgets and exclude_seen filled in
    path: Path | None  # the run folder
    metrics: dict  # what metrics.json holds
    requests: pl.DataFrame
    latency: pl.DataFrame
    budgets: Budgets
    fits: dict  # stage label -> {"stage", "seconds", "cached", "report"}


def _fit(stage: Any, ctx: FitContext, what: str, log: Callable[[str], None]) -> dict:
    t0 = time.perf_counter()
    stage.fit(ctx)
    seconds = time.perf_counter() - t0
    report = getattr(stage, "report", None) or getattr(stage, "fit_report", None) or {}
    report = report if isinstance(report, Mapping) else {}
    cached = bool(report.get("cached", False))
    log(f"fitted {what} in {seconds:.1f}s" + (" (cached checkpoint)" if cached else ""))
    keep = {k: v for k, v in report.items() if k != "history"}
    return {"stage": stage_label(stage), "seconds": seconds, "cached": cached, "report": keep}


@torch.no_grad()
def _score_all_fn(ranker: Any, n_items: int, device: torch.device) -> Callable:
    """batch -> (B, n_items) scores: the ranker's own `score_all` when it has one, else `score`
    over the catalogue in chunks."""
    if callable(getattr(ranker, "score_all", None)):
        return ranker.score_all

    def score_all(batch) -> torch.Tensor:
        b = len(batch)
        chunk = max(1, min(n_items, (1 << 17) // max(b, 1)))
        parts = []
        for start in range(0, n_items, chunk):
            ids = torch.arange(start, min(start + chunk, n_items), device=device)
            parts.append(ranker.score(batch, ids[None, :].expand(b, -1).contiguous()).float())
        return torch.cat(parts, 1)

    return score_all


def reference_metrics(
    lsr: Any,
    prepared: Prepared,
    *,
    exclude_seen: bool,
    batch_size: int,
    final_k: int,
    progress: bool,
    n_requests: int = 0,
) -> tuple[dict, np.ndarray]:
    """HR@10 / NDCG@10 / MRR of the LSR scoring the whole catalogue and of most-popular
    (training counts), with the same seen-item exclusion as retrieval, over `n_requests` evenly
    spaced test requests (0 or more than there are: all). Returns the metrics and the ids of
    the requests scored."""
    from cascade.metrics import hit_rate, mean, ndcg, reciprocal_rank
    from cascade.replay import full_catalogue_ranks

    ds, split, ctx, test = prepared
    if 0 < n_requests < len(test):
        rows = np.unique(np.linspace(0, len(test) - 1, n_requests).round().astype(np.int64))
        test = Traffic(ds, split.test[rows], max_len=test.max_len)
    k = min(10, final_k)
    valid = test.targets >= 0
    lsr_ranks = full_catalogue_ranks(
        _score_all_fn(lsr, ds.n_items, ctx.device), test, batch_size=batch_size,
        exclude_seen=exclude_seen, device=ctx.device, progress=progress,
        description="LSR over the full catalogue",
    )
    pop = torch.as_tensor(ds.item_popularity(split.train), dtype=torch.float32, device=ctx.device)
    pop_ranks = full_catalogue_ranks(
        lambda batch: pop[None, :].expand(len(batch), -1), test, batch_size=batch_size,
        exclude_seen=exclude_seen, device=ctx.device,
    )

    def summary(r: np.ndarray) -> dict:
        return {
            "hr@10": mean(hit_rate(r, valid, k)),
            "ndcg@10": mean(ndcg(r, valid, k)),
            "mrr": mean(reciprocal_rank(r, valid, k)),
        }

    metrics = {
        "lsr_full_catalogue": summary(lsr_ranks),
        "most_popular": summary(pop_ranks),
        "n_requests": len(test),
    }
    return metrics, test.request_id


def variant_metrics(
    frame: pl.DataFrame,
    latency: pl.DataFrame,
    label: str,
    spec: StageSpec,
    stage_names: Mapping[str, str],
    budgets: Budgets,
) -> dict:
    """The metrics.json entry of one ESR variant."""
    from cascade.metrics import (
        HISTORY_BUCKETS,
        POPULARITY_BUCKETS,
        breakdown,
        funnel_latency,
        quality_summary,
        stage_latency,
        survival_chain,
        throughput,
    )

    part = frame.filter(pl.col("variant") == label)
    q = quality_summary(part)
    surv = survival_chain(part)
    stages = []
    for s, k in (("retrieval", budgets.retrieval), ("esr", budgets.esr), ("lsr", budgets.final)):
        per_batch, per_req, _ = stage_latency(latency, label, s)
        stages.append({
            "name": s,
            "stage": spec.stage if s == "esr" else stage_names[s],
            "k": k,
            "recall": q["recall"][s],
            "survival": surv[s],
            "latency_ms": per_batch,
            "latency_per_request_ms": per_req,
        })
    f_batch, f_req, total_ms = funnel_latency(latency, label)
    out: dict[str, Any] = {
        "esr": spec.stage,
        "esr_config": dict(spec.config),
        "n_requests": q["n_requests"],
        "stages": stages,
        "final": {"hr@10": q["hr@10"], "ndcg@10": q["ndcg@10"], "mrr": q["mrr"]},
        "funnel_latency_ms": f_batch,
        "funnel_latency_per_request_ms": f_req,
        "throughput_rps": throughput(part.height, total_ms),
        "consistency@10": None,
        "funnel_loss": None,
    }
    if "rank_oracle" in part.columns:
        o = part.select(
            pl.col("oracle_hit@10").mean().alias("hr@10"),
            pl.col("oracle_ndcg@10").mean().alias("ndcg@10"),
            pl.col("oracle_rr").mean().alias("mrr"),
            pl.col("consistency").mean(),
            # of the requests the LSR would have answered from the whole retrieved set,
            # the share whose target the ESR cut
            (
                (pl.col("rank_oracle").is_not_null() & pl.col("rank_esr").is_null()).sum()
                / pl.col("rank_oracle").is_not_null().sum()
            ).alias("esr_cut_rate"),
        ).row(0, named=True)
        out["consistency@10"] = o["consistency"]
        out["funnel_loss"] = {
            "oracle": {"hr@10": o["hr@10"], "ndcg@10": o["ndcg@10"], "mrr": o["mrr"]},
            "hr@10": o["hr@10"] - q["hr@10"],
            "ndcg@10": o["ndcg@10"] - q["ndcg@10"],
            "mrr": o["mrr"] - q["mrr"],
            "esr_cut_rate": o["esr_cut_rate"],
        }
    out["by_history_length"] = breakdown(part, "hist_bucket", [b[0] for b in HISTORY_BUCKETS])
    out["by_popularity"] = breakdown(part, "pop_bucket", [b[0] for b in POPULARITY_BUCKETS])
    return out


def _default_out(name: str) -> Path:
    """runs/<date-time to the millisecond>-<name>; `write_run(unique=True)` adds -2, -3, ...
    when two runs still pick the same name."""
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S-%f')[:-3]}-{name}"


def run_experiment(
    cfg: RunConfig,
    *,
    progress: bool = True,
    dataset: Dataset | None = None,
    log: Callable[[str], None] | None = None,
    write: bool = True,
) -> RunResult:
    """Train (or load), replay and measure the funnel of `cfg`; write the run folder unless
    `write` is False. `dataset` skips loading `cfg.data`; `log` receives progress lines."""
    from cascade.env import capture
    from cascade.metrics import compare_variants, history_bucket, popularity_buckets, quality_summary
    from cascade.records import check_target, write_run
    from cascade.replay import replay

    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    name = cfg.resolved_name(dataset.name if dataset is not None else None)
    specs, primary, baseline = cfg.variant_specs()

    # 1. every stage resolves and its config builds, before any data is read
    build_stage("retrieval", cfg.retrieval, run_overrides(cfg, "retrieval", cfg.retrieval, True))
    for label, spec in specs.items():
        build_stage("esr", spec)
    build_stage("lsr", cfg.lsr, run_overrides(cfg, "lsr", cfg.lsr, True))
    esrs = {label: build_stage("esr", spec) for label, spec in specs.items()}

    out = Path(cfg.out).expanduser() if cfg.out else _default_out(name)
    if write:
        check_target(out)

    # 2. data
    prepared = prepare(cfg, dataset=dataset, progress=progress)
    ds, split, ctx, test = prepared
    say(
        f"data {ds.name}: {ds.n_users:,} users, {ds.n_items:,} items, {ds.n_events:,} events; "
        f"{split.kind} split, {len(ctx.train):,} training / {len(ctx.valid):,} validation / "
        f"{len(test):,} test requests; device {ctx.device}"
    )

    # 3. budgets and run-level settings, before any training
    budgets = resolve_budgets(ds.n_items, retrieval=cfg.retrieval_k, esr=cfg.esr_k, final=cfg.final_k,
                              esr_share=cfg.esr_share)
    defaults = "" if cfg.retrieval_k and cfg.esr_k else f" (defaults for {ds.n_items:,} items)"
    if cfg.esr_k is None and cfg.esr_share != DEFAULT_ESR_SHARE:
        defaults += f" (the ESR keeps {cfg.esr_share:.0%} of the retrieved candidates)"
    say(f"budgets: {budgets.describe()}{defaults}")
    exclude_seen = cfg.exclude_seen
    if exclude_seen is None:
        share = repeat_share(split)
        exclude_seen = share < REPEAT_SHARE_FOR_EXCLUDE
        say(f"exclude_seen: {exclude_seen} ({share:.1%} of training events are repeats)")
    ctx = dataclasses.replace(ctx, exclude_seen=exclude_seen, index=cfg.index)
    prepared = prepared._replace(ctx=ctx)
    retriever = build_stage(
        "retrieval", cfg.retrieval, run_overrides(cfg, "retrieval", cfg.retrieval, exclude_seen)
    )
    lsr = build_stage("lsr", cfg.lsr, run_overrides(cfg, "lsr", cfg.lsr, exclude_seen))
    resolved = cfg.replace(
        name=name, retrieval_k=budgets.retrieval, esr_k=budgets.esr, final_k=budgets.final,
        exclude_seen=exclude_seen, out=None,
    )

    # 4. fit
    fits = {"retrieval": _fit(retriever, ctx, f"retrieval {stage_label(retriever)}", say)}
    for label, esr in esrs.items():
        fits[f"esr:{label}"] = _fit(esr, ctx, f"esr {label}", say)
    fits["lsr"] = _fit(lsr, ctx, f"lsr {stage_label(lsr)}", say)
    fit_seconds = time.perf_counter() - t_start

    # 5. replay
    pipeline = Pipeline(retriever, esrs, lsr, budgets, device=ctx.device)
    rep = replay(
        pipeline, test, batch_size=cfg.batch_size, oracle=cfg.oracle, warmup=cfg.warmup,
        progress=progress, description=f"replay {len(test):,} requests",
    )
    say(f"replayed {len(test):,} requests in {rep.seconds:.1f}s")

    # 6. metrics
    pop_label = popularity_buckets(ds.item_popularity(split.train))
    frame = rep.requests_frame().with_columns(
        pl.Series("hist_bucket", np.tile(history_bucket(rep.hist_len), len(specs))),
        pl.Series("pop_bucket", np.tile(pop_label[np.maximum(rep.targets[:, 0], 0)], len(specs))),
    )
    stage_names = {"retrieval": stage_label(retriever), "lsr": stage_label(lsr)}
    variants = {
        label: variant_metrics(frame, rep.latency, label, spec, stage_names, budgets)
        for label, spec in specs.items()
    }
    comparisons = {}
    if baseline is not None:
        for label in specs:
            if label != baseline:
                comparisons[label] = compare_variants(
                    frame, label, baseline, n_resamples=cfg.bootstrap, seed=cfg.seed
                )
    reference, ref_seconds = None, 0.0
    if cfg.reference:
        t_ref = time.perf_counter()
        reference, ids = reference_metrics(
            lsr, prepared, exclude_seen=exclude_seen, batch_size=cfg.batch_size,
            final_k=budgets.final, progress=progress, n_requests=cfg.reference_requests,
        )
        full = reference["lsr_full_catalogue"]
        subsampled = len(ids) < len(test)
        for label, v in variants.items():  # the funnel's share of what the LSR alone achieves,
            # on the same requests the reference scored
            same = v["final"]
            if subsampled:
                same = quality_summary(frame.filter(
                    (pl.col("variant") == label) & pl.col("request_id").is_in(pl.Series(ids).implode())
                ))
                v["final_on_reference_requests"] = {m: same.get(m) for m in ("hr@10", "ndcg@10", "mrr")}
            v["vs_lsr_full_catalogue"] = {
                m: (same[m] / full[m] if full[m] and same.get(m) is not None else None)
                for m in ("hr@10", "ndcg@10", "mrr")
            }
        ref_seconds = time.perf_counter() - t_ref
        say(f"reference metrics in {ref_seconds:.1f}s")

    metrics = {
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "name": ds.name,
            "source": ds.source,
            "fingerprint": ds.fingerprint(),
            "split": split.key(),
            "split_kind": split.kind,
            "n_users": ds.n_users,
            "n_items": ds.n_items,
            "n_events": ds.n_events,
            "n_requests": len(test),
            "traffic_key": traffic_key(test),
            "max_len": cfg.max_len,
            "exclude_seen": exclude_seen,
        },
        "budgets": budgets.as_dict(),
        "seed": cfg.seed,
        "device": str(ctx.device),
        "primary": primary,
        "baseline": baseline,
        "stages": {
            "retrieval": cfg.retrieval.to_dict(),
            "lsr": cfg.lsr.to_dict(),
            "esr": {label: spec.to_dict() for label, spec in specs.items()},
        },
        "variants": variants,
        "comparison": comparisons.get(primary, {}) if baseline else None,
        "comparisons": comparisons or None,
        "reference": reference,
        "training": fits,
        "seconds": {
            "fit": fit_seconds,
            "replay": rep.seconds,
            "reference": ref_seconds,
            "total": time.perf_counter() - t_start,
        },
    }

    path = None
    if write:
        path = write_run(
            out,
            config_toml=resolved.to_toml(),
            metrics=metrics,
            requests=frame,
            latency=rep.latency,
            env=capture(),
            finish=_report_writer(say),
            unique=not cfg.out,
        )
    return RunResult(resolved, path, metrics, frame, rep.latency, budgets, fits)


def _report_writer(say: Callable[[str], None]) -> Callable[[Path], None] | None:
    """`cascade.report.write_report` when installed; a failing report never loses the run."""
    try:
        from cascade.report import write_report
    except ImportError:
        return None

    def finish(folder: Path) -> None:
        try:
            write_report(folder)
        except Exception as e:  # noqa: BLE001 - the metrics are written; say what is missing
            say(f"warning: report.md not written: {type(e).__name__}: {e}")

    return finish
