"""Run configuration: `RunConfig` (everything one `cascade run` needs) and `StageSpec` (a stage by
name with its config table), loaded from and saved as TOML.

A TOML file maps onto `RunConfig.from_dict`: top-level keys are `RunConfig` fields, `[split]` is
a `SplitConfig`, `[budgets]` holds `retrieval`, `esr`, `final` and `esr_share`, and each stage is a
name or a table `{stage = ..., config = {...}, label = ...}`. Every value is checked when the file
is read: an unknown key, or a value of the wrong type (`max_requests = "5"`, `dim = 8.5`), is an
error naming the key. Stage config tables are built into the stage's own config dataclass by
`cascade.util.tables.from_table`, the one builder every config uses.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.data.splits import SplitConfig
from cascade.pipeline import DEFAULT_ESR_SHARE, check_esr_share
from cascade.stages.base import StageError, resolve_stage_class
from cascade.util.serialize import dumps_toml
from cascade.util.tables import ConfigError, check_type, from_table

# TOML key of a RunConfig field, where they differ (the budgets table)
_KEY_NAMES = {"retrieval_k": "budgets.retrieval", "esr_k": "budgets.esr",
              "final_k": "budgets.final", "esr_share": "budgets.esr_share"}

DEVICES = ("auto", "cpu", "cuda")
# where replay runs (`cascade.backends`): this process, or Ray actors (`pip install -e ".[ray]"`)
BACKENDS = ("inprocess", "ray")
REPEAT_SHARE_FOR_EXCLUDE = 0.05  # exclude_seen "auto": exclude unless repeats are this common
MAX_NAME_BYTES = 200  # a run's name ends its folder's name (runs/<time>-<name>, 255 bytes at most)


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
        if not isinstance(self.baseline, bool):
            raise ValueError(f"stage {self.stage!r}: baseline must be true or false, got "
                             f"{self.baseline!r}")

    @property
    def display(self) -> str:
        """The variant label: `label`, else the stage name ('module:Class' -> 'Class')."""
        return self.label or self.stage.rsplit(":", 1)[-1]

    @classmethod
    def parse(cls, value: Any, where: str) -> StageSpec:
        if isinstance(value, StageSpec):
            return value
        if isinstance(value, str):
            try:
                return cls(stage=value)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
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
    "cache_dir", "retrain", "out", "oracle", "oracle_requests", "reference", "reference_requests",
    "warmup",
    "bootstrap", "backend", "ray_address", "workers",
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
    # test requests the oracle pass scores (evenly spaced, the same ones as the reference when
    # the counts are equal); 0: every test request
    oracle_requests: int = 500
    reference: bool = True  # LSR over the full catalogue and most-popular reference points
    # test requests the full-catalogue reference scores (evenly spaced). Scoring
    # every item with the LSR costs n_items / retrieval_k times the funnel's LSR pass, so by
    # default it runs on a subsample; the funnel's share of it is taken on the same requests.
    # None: 500, fewer where that would score more than REFERENCE_PAIRS (request, item) pairs
    # (a catalogue past 20,000 items; resolved by the session); 0: every test request.
    reference_requests: int | None = None
    warmup: int = 1  # untimed replay batches before timing
    bootstrap: int = 1000  # paired bootstrap resamples
    backend: str = "inprocess"  # inprocess | ray: where replay runs (cascade.backends)
    # ray only: "auto", "ray://host:port", "host:port"; None starts a local Ray
    ray_address: str | None = None
    workers: int | None = None  # ray only: replay workers (None: one per CPU of the Ray cluster)

    def __post_init__(self) -> None:
        if self.name is not None and (
            not isinstance(self.name, str) or not self.name.strip() or "/" in self.name
            or len(self.name.encode()) > MAX_NAME_BYTES or not self.name.isprintable()
        ):
            got = repr(self.name)
            raise ValueError(
                f"RunConfig.name must be a non-empty name without '/' or control characters, at "
                f"most {MAX_NAME_BYTES} bytes (it names the run folder), got "
                + (got if len(got) <= 60 else f"{got[:60]}... ({len(self.name)} characters)"))
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"RunConfig.data must be a dataset name or path, got {self.data!r}")
        if not isinstance(self.split, SplitConfig):
            raise ValueError("RunConfig.split must be a SplitConfig")
        _int(self.max_len, "RunConfig.max_len", minimum=1)
        _int(self.seed, "RunConfig.seed", minimum=0)
        if self.seed >= 2**32:
            raise ValueError(f"RunConfig.seed must be < 2**32 (4294967296), got {self.seed}")
        _int(self.batch_size, "RunConfig.batch_size", minimum=1)
        _int(self.warmup, "RunConfig.warmup", minimum=0)
        _int(self.bootstrap, "RunConfig.bootstrap", minimum=10)
        _int(self.retrieval_k, "budgets.retrieval", minimum=2, optional=True)
        _int(self.esr_k, "budgets.esr", minimum=2, optional=True)
        _int(self.final_k, "budgets.final", minimum=1)
        _int(self.reference_requests, "RunConfig.reference_requests", minimum=0, optional=True)
        _int(self.oracle_requests, "RunConfig.oracle_requests", minimum=0)
        check_esr_share(self.esr_share)
        if self.backend not in BACKENDS:
            raise ValueError(f"RunConfig.backend must be one of {', '.join(BACKENDS)}, got "
                             f"{self.backend!r}")
        _int(self.workers, "RunConfig.workers", minimum=1, optional=True)
        if self.ray_address is not None and (not isinstance(self.ray_address, str)
                                             or not self.ray_address.strip()):
            raise ValueError(f"RunConfig.ray_address must be auto, ray://host:port or host:port, "
                             f"got {self.ray_address!r}")
        for name in ("ray_address", "workers"):
            if getattr(self, name) is not None and self.backend != "ray":
                raise ValueError(f"RunConfig.{name} needs backend = 'ray' (got backend "
                                 f"{self.backend!r})")
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
            kw["split"] = from_table(SplitConfig, d["split"], f"{where}: split")
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
        for k in ("cache_dir", "out"):  # paths given as Path by library callers
            if isinstance(kw.get(k), Path):
                kw[k] = str(kw[k])
        hints = typing.get_type_hints(cls)
        for k, v in kw.items():  # a wrong-typed value names its key before anything else
            if k not in ("split", "retrieval", "esr", "lsr", "esr_baseline", "esr_variants"):
                check_type(v, hints[k], f"{where}: {_KEY_NAMES.get(k, k)}")
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_toml(path), where=f"config file {Path(path).expanduser()}")

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
            "oracle_requests": self.oracle_requests,
            "reference": self.reference,
            "reference_requests": self.reference_requests,
            "warmup": self.warmup,
            "bootstrap": self.bootstrap,
            "backend": self.backend,
            "ray_address": self.ray_address,
            "workers": self.workers,
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
        return dumps_toml(self.to_dict())

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _stage_override(old, stage: str | None):
    """A CLI stage name replaces the TOML's spec, keeping its config when the stage is the same."""
    if stage is None:
        return old
    if old is not None and old.stage == stage:
        return old
    return StageSpec(stage=stage)


def config_with_overrides(config: str | Path | None, overrides: Mapping[str, Any]) -> RunConfig:
    """The RunConfig from an optional TOML file plus command-line overrides (None = not given).
    A stage named on the command line replaces the TOML's, keeping its config table when it is
    the same stage; explicit ESRs replace the TOML's `esr_variants`."""
    cfg = RunConfig.load(config) if config is not None else RunConfig()
    ch: dict[str, Any] = {}
    o = {k: v for k, v in overrides.items() if v is not None}
    hints = typing.get_type_hints(RunConfig)
    for k, v in o.items():  # flags are typed by the CLI; library callers get the same check
        if k in hints and k not in ("esr", "esr_baseline", "retrieval", "lsr", "esr_variants",
                                    "out", "cache_dir"):
            check_type(v, hints[k], k)
    if "esr" in o or "esr_baseline" in o:
        if cfg.esr_variants:  # explicit ESRs on the command line replace the TOML's variants
            ch["esr_variants"] = ()
        ch["esr"] = _stage_override(cfg.esr, o.pop("esr", None))
        ch["esr_baseline"] = _stage_override(cfg.esr_baseline, o.pop("esr_baseline", None))
    for k in ("retrieval", "lsr"):
        if k in o:
            ch[k] = _stage_override(getattr(cfg, k), o.pop(k))
    split_changes = {}
    if "split" in o:
        split_changes["kind"] = o.pop("split")
    if "max_requests" in o:
        split_changes["max_requests"] = o.pop("max_requests")
    if split_changes:
        ch["split"] = dataclasses.replace(cfg.split, **split_changes)
    for k in ("out", "cache_dir"):
        if k in o:
            o[k] = str(o[k])
    ch.update(o)
    try:
        return dataclasses.replace(cfg, **ch)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict, with errors naming the file: unreadable, not a regular file, not
    UTF-8 (a byte-order mark is allowed), invalid TOML."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_file():
        raise ValueError(f"config file {p}: not a regular file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"config file {p}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"config file {p}: not UTF-8 text (byte {e.start}); a config is a TOML file"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {p}: invalid TOML ({e})") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ValueError(f"config file {p}: invalid TOML (arrays or tables nested too deeply)"
                         ) from None


def stage_config(kind: str, spec: StageSpec) -> Any:
    """The stage class of `spec` and its config built from the spec's table: (cls, config or
    None when the class has no `config_class`). Errors name the stage and the key."""
    cls = resolve_stage_class(kind, spec.stage)
    values = dict(spec.config)
    where = f"{kind} stage {spec.stage!r} config"
    cc = getattr(cls, "config_class", None)
    if cc is None:
        if values:
            raise ConfigError(
                f"{where}: {cls.__name__} has no config_class, so it takes no config "
                f"(got {', '.join(values)})"
            )
        return cls, None
    return cls, from_table(cc, values, where)


def build_stage(kind: str, spec: StageSpec | str) -> Any:
    """An unfitted stage: resolve `spec` (registered name, entry point or 'module:Class'), build
    its config dataclass from the spec's table and construct it."""
    spec = StageSpec.parse(spec, kind)
    cls, config = stage_config(kind, spec)
    name = getattr(cls, "__name__", repr(cls))
    try:
        return cls() if config is None else cls(config=config)
    except TypeError as e:
        raise StageError(
            f"{kind} stage {spec.stage!r} ({name}) cannot be constructed: {e} "
            "(a stage must be constructible with no arguments, or with config=)"
        ) from None
    except (StageError, KeyboardInterrupt):
        raise
    except SystemExit as e:  # a plugin must never end a run silently
        raise StageError(f"{kind} stage {spec.stage!r} ({name}) called sys.exit({e.code!r}) "
                         "when constructed") from None
    except Exception as e:  # noqa: BLE001 - the stage's own constructor failed
        raise StageError(f"{kind} stage {spec.stage!r} ({name}) cannot be constructed: "
                         f"{type(e).__name__}: {e}") from e
