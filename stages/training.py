"""The one training loop every learned stage uses, and the checkpoint cache around it.

Model code (the stages) stays separate from this loop, which owns the device, the seed, the
progress bar, early stopping on the validation split and the checkpoints. A stage supplies:
- `loss_fn(batch, generator) -> scalar Tensor` for one training batch (already on the device);
- `valid_fn() -> float`, higher is better (e.g. `sampled_mrr` or full-catalogue recall).

A checkpoint that cannot be loaded (truncated, random bytes, empty, another stage's weights, a
damaged meta.json) is reported in one line on stderr and the stage is trained again, from the same
initial weights, and the checkpoint rewritten: a damaged cache heals without `--retrain`.

Checkpoints are cached by (stage name, stage config, dataset fingerprint, split, seed, history
length, the run's exclude_seen): a state dict saved with `torch.save` plus a JSON of the config
and training report, loaded with `weights_only=True`, both written atomically
(`cascade.util.fsio`: temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import zipfile
import io
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from cascade.data.traffic import RequestBatch, Traffic
from cascade.stages.base import FitContext
from cascade.stages.features import id_embedding_tables
from cascade.util.fsio import atomic_write_bytes
from cascade.util.progress import Progress


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    patience: int = 2  # epochs without validation improvement before stopping
    max_steps_per_epoch: int | None = None  # cap for large logs
    grad_clip: float = 5.0
    # item/user id tables (`features.id_embedding_tables`) get sparse gradients and SparseAdam
    # (no weight decay), the rest AdamW: a step then costs the rows its batch touches, not the
    # whole catalogue. None (auto): on from SPARSE_AUTO_ITEMS items up, where dense AdamW over
    # every row dominates a step; off below, where it would change the numbers for little
    # (SparseAdam leaves rows without a gradient alone, where Adam's momentum keeps moving them).
    sparse_embeddings: bool | None = None
    # batches of requests of similar history length, each trimmed to its longest
    # (`Traffic.length_batches`), in place of uniformly shuffled ones: a log of mostly short
    # histories pays little for padding. A loss averaged over events should scale a batch by its
    # event count (`features.mean_batch_events`); a per-request loss needs nothing
    length_batches: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.sparse_embeddings is not None and not isinstance(self.sparse_embeddings, bool):
            raise ValueError("TrainConfig.sparse_embeddings must be true, false or left out (auto), got "
                             f"{self.sparse_embeddings!r}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(
                f"TrainConfig.max_steps_per_epoch must be >= 1 or None, got {self.max_steps_per_epoch}"
            )


SPARSE_AUTO_ITEMS = 100_000  # `TrainConfig.sparse_embeddings` None: sparse from this many items


def uses_sparse_embeddings(cfg: TrainConfig, n_items: int) -> bool:
    """Whether `fit_model` trains the id tables with sparse gradients (the config's choice, or
    auto: catalogues of `SPARSE_AUTO_ITEMS` items and more)."""
    if cfg.sparse_embeddings is not None:
        return cfg.sparse_embeddings
    return n_items >= SPARSE_AUTO_ITEMS


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def check_rate(value: Any, name: str) -> float:
    """`value` as a float rate in [0, 1) (a dropout rate); else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_dropout_search(dropout: float, search: Any, where: str) -> tuple[float, ...]:
    """A config's `dropout_search` as a tuple of distinct rates in [0, 1), without its
    `dropout` (already tried first: a default search that holds the rate a user set searches
    nothing more); else a ValueError naming `where`."""
    if not isinstance(search, (tuple, list)):
        raise ValueError(f"{where}.dropout_search must be a list of dropout rates, got {search!r}")
    rates = [check_rate(p, f"{where}.dropout_search values") for p in search]
    if len(set(rates)) != len(rates):
        raise ValueError(f"{where}.dropout_search repeats a rate: {list(search)}")
    return tuple(p for p in rates if p != dropout)


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout layer of `model` to rate `p` (a model whose dropout lives in `nn.Dropout`
    modules alone, attention dropout included)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def search_settings(
    model: nn.Module, settings: list[dict], apply: Callable[[dict], None],
    run: Callable[[dict | None], dict], times: tuple[str, ...] = ("seconds",),
) -> dict:
    """Train `model` with `run(setting)` once per setting (e.g. `{"dropout": 0.5}`), each from
    the same initial weights after `apply(setting)`, and keep the setting whose run validates
    best (`best_valid`; a tie keeps the earlier) with its weights. One setting: `run(None)`, the
    model as built. The report is the kept run's plus its setting's keys, with its `times` keys
    summed over every setting and `search` listing each setting tried."""
    if len(settings) == 1:
        return run(None)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tried, best = [], None
    for setting in settings:
        model.load_state_dict(start)
        apply(setting)
        report = run(setting)
        tried.append({**setting, "best_valid": report["best_valid"], "epochs_run": report["epochs_run"],
                      **{k: report[k] for k in times}})
        if best is None or report["best_valid"] > best[1]["best_valid"]:
            best = (setting, report, {k: v.detach().clone() for k, v in model.state_dict().items()})
    setting, report, state = best
    model.load_state_dict(state)
    apply(setting)
    return {**report, **{k: sum(t[k] for t in tried) for k in times}, **setting, "search": tried}


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def cache_key(stage: str, config: Any, ctx: FitContext) -> str:
    payload = json.dumps(
        {
            "stage": stage,
            "config": _jsonable(config),
            "dataset": ctx.dataset.fingerprint(),
            "split": ctx.split.key(),
            "seed": ctx.seed,
            "max_len": ctx.train.max_len,
            # validation (early stopping) hides seen items when the run does
            "exclude_seen": ctx.exclude_seen,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class CheckpointError(ValueError):
    """A cached checkpoint that cannot be loaded into its stage's model."""


def _load_checkpoint(model: nn.Module, path: Path, device: torch.device) -> dict:
    """Load `path`/model.pt into `model` and return meta.json's report, or raise
    `CheckpointError` naming the file and what is wrong with it. The file is checked to be a
    non-empty torch zip archive before torch reads it (an empty file can abort the process)."""
    weights, meta_file = path / "model.pt", path / "meta.json"
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        if weights.stat().st_size == 0 or not zipfile.is_zipfile(weights):
            raise CheckpointError(f"checkpoint {weights} is empty or not a torch archive")
        try:
            state = torch.load(weights, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several kinds for a damaged file
            raise CheckpointError(f"checkpoint {weights} cannot be read ({type(e).__name__})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {weights} does not hold a state dict")
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {weights} does not fit this stage ({first[:160]})") from None
        try:
            meta = json.loads(meta_file.read_text())
            report = meta["report"]
            if not isinstance(report, dict):
                raise TypeError("report is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint metadata {meta_file} is damaged ({e})") from None
    except CheckpointError:
        model.load_state_dict(before)  # retrain from the same initial weights
        raise
    return report


def cached_fit(
    model: nn.Module,
    *,
    stage: str,
    config: Any,
    ctx: FitContext,
    train: Callable[[], dict],
    serving: tuple[str, ...] = (),
) -> dict:
    """Load `model`'s weights from the cache, or run `train()` (which fits `model` in place and
    returns a JSON-able report) and cache them. Returns the report, with "cached" set.
    `serving` names config fields that only change how the trained model is served (an index,
    a chunk size): they are left out of the key, so changing them reuses the checkpoint."""
    if serving:
        config = {k: v for k, v in _jsonable(config).items() if k not in serving}
    path = None
    if ctx.cache_dir is not None:
        path = Path(ctx.cache_dir) / f"{stage}-{cache_key(stage, config, ctx)}"
        if not ctx.retrain and (path / "model.pt").exists() and (path / "meta.json").exists():
            try:
                report = _load_checkpoint(model, path, ctx.device)
                return {**report, "cached": True, "checkpoint": str(path)}
            except CheckpointError as e:  # a damaged checkpoint heals: say so, train again
                print(f"warning: {e}; training {stage} again", file=sys.stderr, flush=True)
    report = train()
    if path is not None:
        atomic_torch_save(model.state_dict(), path / "model.pt")
        meta = {"stage": stage, "config": _jsonable(config), "report": report}
        atomic_write_bytes(path / "meta.json", json.dumps(meta, indent=2).encode())
        report = {**report, "checkpoint": str(path)}
    return {**report, "cached": False}


class Optimizer:
    """AdamW over every parameter or, given sparse id tables, `SparseAdam` over those and AdamW
    over the rest, driven as one. Gradient clipping is by the global norm either way
    (`nn.utils.clip_grad_norm_` cannot read sparse gradients, so the sparse path computes it)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, tables: list[nn.Embedding]) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sparse = [t.weight for t in tables]
        ids = {id(p) for p in self.sparse}
        dense = [p for p in self.params if id(p) not in ids]
        self.opts: list[torch.optim.Optimizer] = []
        if self.sparse:
            self.opts.append(torch.optim.SparseAdam(self.sparse, lr=cfg.lr))
        if dense or not self.sparse:
            self.opts.append(torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay))

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)

    def clip(self, max_norm: float) -> None:
        if not self.sparse:
            nn.utils.clip_grad_norm_(self.params, max_norm)
            return
        for p in self.sparse:  # one row per index (and rows a dense use touched, as sparse rows)
            if p.grad is not None:
                p.grad = p.grad.coalesce() if p.grad.is_sparse else p.grad.to_sparse(1)
        grads = [p.grad for p in self.params if p.grad is not None]
        total = torch.sqrt(sum(
            (g._values() if g.is_sparse else g).float().pow(2).sum() for g in grads
        )) if grads else torch.tensor(0.0)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad = p.grad * coef.to(p.grad.device) if p.grad.is_sparse else p.grad.mul_(coef)

    def step(self) -> None:
        for opt in self.opts:
            opt.step()


def fit_model(
    model: nn.Module,
    loss_fn: Callable[[RequestBatch, torch.Generator], Tensor],
    valid_fn: Callable[[], float],
    ctx: FitContext,
    cfg: TrainConfig,
    *,
    desc: str,
    train: Traffic | None = None,
    validate_first: bool = False,
) -> dict:
    """Train `model` in place with AdamW (with `cfg.sparse_embeddings`: SparseAdam for the id
    tables) and early stopping; restore the best epoch's weights. Returns a report: epochs run,
    best epoch, best validation metric, seconds, final loss. Batches: `cfg.length_batches`.
    `validate_first`: the weights it starts from are validated first and kept (best epoch -1)
    unless an epoch beats them (a second phase that must not undo the first)."""
    traffic = ctx.train if train is None else train
    gen = seed_everything(ctx.seed)
    model.to(ctx.device)
    tables = []
    sparse = uses_sparse_embeddings(cfg, ctx.dataset.n_items)
    if sparse:
        tables = id_embedding_tables(model, ctx.dataset.n_items, ctx.dataset.n_users)
    opt = Optimizer(model, cfg, tables)
    steps = traffic.n_batches(cfg.batch_size)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    best, best_epoch, best_state, bad = -math.inf, -1, None, 0
    history: list[dict] = []
    t0 = time.perf_counter()
    if validate_first:  # the starting weights compete too (epoch -1): training cannot lose them
        model.eval()
        with torch.no_grad():
            best = float(valid_fn())
        history.append({"epoch": -1, "loss": None, "valid": best})
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step_s = opt_s = 0.0  # time in training steps, and in the optimiser's part of them
    for t in tables:  # serving is unchanged: only the backward pass differs
        t.sparse = True
    # a bar on a terminal, plain lines in a log (cascade.util.progress); early stopping may end
    # it before the total
    with _dense_afterwards(tables), Progress(
        f"training {desc}", total=cfg.epochs * steps, unit="steps", enabled=ctx.progress,
    ) as bar:
        for epoch in range(cfg.epochs):
            model.train()
            total, n = 0.0, 0
            seed = ctx.seed * 1000 + epoch
            batches = (traffic.length_batches(cfg.batch_size, seed=seed) if cfg.length_batches
                       else traffic.batches(cfg.batch_size, shuffle=True, seed=seed))
            for step, batch in enumerate(batches):
                if step >= steps:
                    break
                ts = time.perf_counter()
                loss = loss_fn(batch.trimmed().to(ctx.device), gen)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{desc}: training loss became {loss.item()} at epoch {epoch}")
                to = time.perf_counter()
                opt.zero_grad()
                to = time.perf_counter() - to
                loss.backward()
                tc = time.perf_counter()
                if cfg.grad_clip:
                    opt.clip(cfg.grad_clip)
                opt.step()
                opt_s += to + time.perf_counter() - tc
                total += float(loss.detach())
                step_s += time.perf_counter() - ts
                n += 1
                bar.advance(1)
            model.eval()
            with torch.no_grad():
                metric = float(valid_fn())
            history.append({"epoch": epoch, "loss": total / max(n, 1), "valid": metric})
            bar.advance(0, info=f"epoch {epoch}: loss {total / max(n, 1):.4f} valid {metric:.4f}")
            if metric > best:
                best, best_epoch, bad = metric, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_valid": best,
        "seconds": time.perf_counter() - t0,
        "train_step_s": step_s,  # the steps alone (no validation)
        "optimizer_s": opt_s,  # zero_grad, clipping and the optimiser steps within them
        "sparse_embeddings": sparse,
        "history": history,
    }


@contextlib.contextmanager
def _dense_afterwards(tables: list[nn.Embedding]):
    try:
        yield
    finally:
        for t in tables:
            t.sparse = False


@torch.no_grad()
def sampled_mrr(
    score: Callable[[RequestBatch, Tensor], Tensor],
    valid: Traffic,
    device: torch.device,
    *,
    n_negatives: int = 100,
    batch_size: int = 512,
    seed: int = 0,
) -> float:
    """Mean reciprocal rank of each request's first target among itself plus `n_negatives`
    uniform random items (fixed seed, so epochs are comparable). Ties count against the target."""
    gen = torch.Generator().manual_seed(seed)
    n_items = valid.dataset.n_items
    rr_sum, count = 0.0, 0
    for batch in valid.batches(batch_size):
        batch = batch.to(device)
        pos = batch.targets[:, :1]
        neg = torch.randint(0, n_items, (len(batch), n_negatives), generator=gen).to(device)
        cand = torch.cat([pos, neg], dim=1)  # (B, 1 + n_neg)
        s = score(batch, cand).float()
        is_pos = neg == pos
        beats = (s[:, 1:] >= s[:, :1]) & ~is_pos
        rank = 1 + beats.sum(1)
        rr_sum += float((1.0 / rank.float()).sum())
        count += len(batch)
    return rr_sum / max(count, 1)
