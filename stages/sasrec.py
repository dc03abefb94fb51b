"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), trained with a
full-softmax cross-entropy over the catalogue (Klenitskiy & Vasilev, RecSys 2023: "Turning
Dross Into Gold Loss: is BERT4Rec really better than SASRec?").

The model: an item embedding table shared by input and output (ids shifted by one so 0 pads),
learned position embeddings counted back from the most recent event (so "the last event" always
has the same position), dropout, `n_layers` pre-norm causal self-attention blocks, a final layer
norm. A request's user vector is the hidden state at its last history event; a candidate's score
is the dot product of that vector with the candidate's embedding.

Training is sequence-level: every position of every training sequence predicts the next item in
one step (no per-event re-encoding). A user's training events are cut, from the most recent
backwards, into windows of `max_len` inputs, so long histories are used whole. The loss is the
cross-entropy over the full catalogue when it has at most `full_softmax_items` items, else a
sampled softmax over `n_negatives` items drawn in proportion to popularity^0.75 with the logQ
correction (Bengio & Senecal; Yi et al., RecSys 2019) and accidental hits removed.

Early stopping is on full-catalogue NDCG@10 of the validation requests (seen items excluded as
the run excludes them), checked every epoch, within `time_budget_s`. The dropout rate is chosen
the same way: training runs once per rate of `dropout` and `dropout_search`, and the
best-validating run is kept. It serves as every kind of stage: retrieval (a FAISS index over
the item embeddings, `index` a factory string), ESR and LSR (`score`, `score_all`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.data.traffic import RequestBatch, Traffic
from cascade.stages.base import Candidates, FitContext, StageError, register
from cascade.stages.features import catalogue_valid_requests
from cascade.stages.learned import LearnedStage
from cascade.stages.retrieval import build_index, index_search, search_with_exclusion, validate_index_spec
from cascade.stages.training import (
    TrainConfig, check_dropout_search, search_settings, seed_everything, set_dropout,
)
from cascade.util.progress import Progress
from cascade.util.ranking import ndcg, ranks_from_scores

MODEL_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class SASRecConfig:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.3
    # other rates tried beside `dropout`, chosen by validation on the user's own log
    # (`stages.training.search_settings`): training runs once per rate from the same initial
    # weights and the best-validating rate is kept with its weights, at twice the fit time. The
    # best rate follows the log's density: Amazon Toys (5.6 training events per user), all test
    # requests, HR@10 / NDCG@10 0.0782 / 0.0496 at 0.3 and 0.0832 / 0.0520 at 0.5 (SASRec's
    # rate for Amazon logs); ml-100k (106 per user) 0.173 / 0.0876 at 0.3 and 0.136 / 0.0697 at
    # 0.5. Validation picked 0.5 on Toys and 0.3 on ml-100k
    dropout_search: tuple[float, ...] = (0.5,)
    max_len: int | None = None  # window length; None: the run's max_len
    loss: Literal["auto", "full", "sampled"] = "auto"
    # "auto": the full softmax up to this many items (the LSR's limit too), past which the
    # (positions x items) logits dominate an epoch on a CPU. Amazon Toys (11,924 items), all
    # 19,412 test requests: full softmax HR@10 / NDCG@10 0.0782 / 0.0496 in 101 s on 2 cores
    full_softmax_items: int = 16384
    n_negatives: int = 512  # sampled softmax: negatives shared by a batch
    valid_requests: int = 2000  # early stopping on at most this many validation requests
    time_budget_s: float | None = None  # seconds per training run (one run per dropout rate)
    index: str = "Flat"  # retrieval: faiss.index_factory string
    nprobe: int = 16  # IVF indexes: lists probed per query
    ef_search: int = 128  # HNSW indexes: search breadth
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=200, batch_size=128, lr=3e-3, weight_decay=0.0, patience=3, grad_clip=5.0
        )
    )

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_negatives", "valid_requests",
                     "full_softmax_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"SASRecConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"SASRecConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "dropout_search", check_dropout_search(
            self.dropout, self.dropout_search, "SASRecConfig"))
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"SASRecConfig.max_len must be >= 1 or unset, got {self.max_len}")
        if self.loss not in ("auto", "full", "sampled"):
            raise ValueError(f"SASRecConfig.loss must be auto, full or sampled, got {self.loss!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"SASRecConfig.time_budget_s must be > 0 or unset, got {self.time_budget_s}")
        validate_index_spec(self.index, self.dim)


class CausalBlock(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a GELU MLP. Sequences
    are left-aligned, so under the causal mask a real position never sees padding and no key
    padding mask is needed (padded positions are never read)."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_drop = nn.Dropout(dropout)  # its rate, read by the attention call below
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(  # (B, H, L, d/H)
            q, k, v, is_causal=True, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class SASRecModel(nn.Module):
    def __init__(self, n_items: int, max_len: int, cfg: SASRecConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.max_len = max_len
        self.item = nn.Embedding(n_items + 1, d, padding_idx=0)  # id + 1; 0 pads
        self.pos = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(CausalBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.item.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()
        nn.init.normal_(self.pos.weight, std=0.02)

    def encode(self, seq: Tensor, lengths: Tensor) -> Tensor:
        """seq (B, L) item ids + 1, left-aligned, 0 at padding; lengths (B,) -> (B, L, D)."""
        b, n = seq.shape
        steps = torch.arange(n, device=seq.device)
        back = (lengths[:, None] - 1 - steps[None, :]).clamp(0, self.max_len - 1)  # (B, L)
        x = self.item(seq) * math.sqrt(self.item.embedding_dim) + self.pos(back)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def items(self) -> Tensor:
        """(n_items, D) output embeddings, shared with the input table."""
        return self.item.weight[1:]

    def user(self, batch: RequestBatch) -> Tensor:
        """(B, D): the hidden state at each request's most recent history event (zeros when the
        request has no history)."""
        n = min(batch.hist_items.shape[1], self.max_len)
        lengths = batch.hist_len.clamp(max=n)
        # the most recent `n` events, left-aligned: drop older ones beyond the window
        start = (batch.hist_len - lengths).clamp_min(0)
        idx = (start[:, None] + torch.arange(n, device=start.device)[None, :]).clamp(
            max=max(batch.hist_items.shape[1] - 1, 0))
        items = torch.gather(batch.hist_items, 1, idx) if n else batch.hist_items[:, :0]
        valid = torch.arange(n, device=start.device)[None, :] < lengths[:, None]
        seq = torch.where(valid, items + 1, torch.zeros_like(items))
        if n == 0:
            return torch.zeros(len(batch), self.item.embedding_dim, device=seq.device)
        h = self.encode(seq, lengths.clamp_min(1))
        last = h[torch.arange(len(batch), device=h.device), (lengths - 1).clamp_min(0)]
        return torch.where((lengths > 0)[:, None], last, torch.zeros_like(last))


@dataclass(frozen=True)
class Windows:
    """Training windows: inputs (W, L) item ids + 1 (0 pads, left-aligned), targets (W, L) item
    ids (-1 at padding), lengths (W,)."""

    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def training_windows(train_events: pl.DataFrame, window: int) -> Windows:
    """Every user's training sequence (events in `pos` order) as next-item windows of at most
    `window` inputs, cut from the most recent event backwards."""
    ev = train_events.sort(["user", "pos"]).select("user", "item")
    users = ev["user"].to_numpy()
    items = ev["item"].to_numpy().astype(np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    ins, tgs, lens = [], [], []
    for s, e in zip(starts, ends):  # one Python step per window, not per event
        n = e - s - 1  # number of (input, next) pairs
        stop = e - 1
        while n > 0:
            m = min(window, n)
            a = stop - m
            ins.append(items[a:stop])
            tgs.append(items[a + 1:stop + 1])
            lens.append(m)
            stop, n = a, n - m
    w = len(lens)
    inputs = np.zeros((w, window), np.int64)
    targets = np.full((w, window), -1, np.int64)
    for i, (x, y) in enumerate(zip(ins, tgs)):
        inputs[i, : len(x)] = x + 1
        targets[i, : len(y)] = y
    return Windows(inputs, targets, np.asarray(lens, np.int64))


def sampled_softmax_loss(
    h: Tensor, targets: Tensor, items: Tensor, negatives: Tensor, log_q: Tensor
) -> Tensor:
    """Cross-entropy of each row of `h` (P, D) against its target among the shared `negatives`
    (N,), logits corrected by the sampling log-probability `log_q` (n_items,) (logQ correction);
    a negative equal to the row's target is removed (accidental hit)."""
    pos = (h * items[targets]).sum(-1, keepdim=True) - log_q[targets][:, None]  # (P, 1)
    neg = h @ items[negatives].T - log_q[negatives][None, :]  # (P, N)
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(h), dtype=torch.int64, device=h.device))


def full_softmax_loss(h: Tensor, targets: Tensor, items: Tensor) -> Tensor:
    """Cross-entropy of each row of `h` (P, D) against its target over every item."""
    return F.cross_entropy(h @ items.T, targets)


@torch.no_grad()
def validation_ndcg(model: SASRecModel, valid: Traffic, device: torch.device,
                    exclude_seen: bool, batch_size: int = 512) -> float:
    """Mean full-catalogue NDCG@10 of the first target of each validation request."""
    model.eval()
    items = model.items()
    total, count = 0.0, 0
    for batch in valid.batches(batch_size):
        batch = batch.to(device)
        scores = model.user(batch) @ items.T  # (B, n_items)
        if exclude_seen:
            r, c = batch.hist_mask.nonzero(as_tuple=True)
            scores[r, batch.hist_items[r, c]] = float("-inf")
        tg = batch.targets[:, :1].cpu().numpy()
        ranks = ranks_from_scores(scores.cpu().numpy(), tg)
        total += float(ndcg(ranks, tg >= 0, 10).sum())
        count += len(batch)
    return total / max(count, 1)


def train_sasrec(model: SASRecModel, ctx: FitContext, cfg: SASRecConfig, window: int,
                 desc: str) -> dict:
    """Sequence-level training with early stopping (see the module docstring). Returns the fit
    report."""
    device = ctx.device
    gen = seed_everything(ctx.seed)
    model.to(device)
    wins = training_windows(ctx.split.train, window)
    if len(wins) == 0:
        raise StageError(f"{desc}: no user has two training events; nothing to learn from")
    n_items = ctx.dataset.n_items
    full = cfg.loss == "full" or (cfg.loss == "auto" and n_items <= cfg.full_softmax_items)
    counts = np.bincount(ctx.split.train["item"].to_numpy(), minlength=n_items).astype(np.float64)
    probs = (counts + 1.0) ** 0.75
    probs /= probs.sum()
    probs_t = torch.as_tensor(probs, dtype=torch.float32, device=device)
    log_q = torch.log(probs_t * cfg.n_negatives)
    valid = ctx.valid
    n_valid = catalogue_valid_requests(cfg.valid_requests, n_items)  # full-catalogue checks
    if len(valid) > n_valid:
        keep = np.unique(np.linspace(0, len(valid) - 1, n_valid).round().astype(np.int64))
        valid = Traffic(ctx.dataset, ctx.split.valid[keep], max_len=valid.max_len)
    tc = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    inputs = torch.as_tensor(wins.inputs)
    targets = torch.as_tensor(wins.targets)
    lengths = torch.as_tensor(wins.lengths)
    # batches of windows of similar length, trimmed to their longest: short sequences (most of
    # a sparse log) do not pay for a full window of padding
    by_length = torch.as_tensor(np.argsort(-wins.lengths, kind="stable"))
    steps = -(-len(wins) // tc.batch_size)
    if tc.max_steps_per_epoch is not None:
        steps = min(steps, tc.max_steps_per_epoch)
    best, best_epoch, best_state, bad = -math.inf, -1, None, 0
    history: list[dict] = []
    t0 = time.perf_counter()
    stopped = "patience"
    with Progress(desc, total=tc.epochs, unit="epochs", enabled=ctx.progress) as bar:
        for epoch in range(tc.epochs):
            model.train()
            # reshuffle windows within runs of equal length, then the order of the batches
            jitter = torch.rand(len(wins), generator=gen)
            order = by_length[torch.argsort(torch.as_tensor(-wins.lengths[by_length.numpy()]) + jitter * 0.5)]
            groups = list(order.split(tc.batch_size))
            total, n = 0.0, 0
            for step in torch.randperm(len(groups), generator=gen)[:steps].tolist():
                rows = groups[step]
                width = int(lengths[rows].max())
                seq = inputs[rows, :width].to(device)
                tg = targets[rows, :width].to(device)
                h = model.encode(seq, lengths[rows].to(device))
                keep = tg >= 0
                hk, yk = h[keep], tg[keep]  # only real positions reach the output layer
                items = model.items()
                if full:
                    loss = full_softmax_loss(hk, yk, items)
                else:
                    neg = torch.multinomial(probs_t, cfg.n_negatives, replacement=True,
                                            generator=None)
                    loss = sampled_softmax_loss(hk, yk, items, neg, log_q)
                if not torch.isfinite(loss):
                    raise StageError(f"{desc}: training loss became {loss.item()} at epoch {epoch}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                total += float(loss.detach())
                n += 1
            metric = validation_ndcg(model, valid, device, ctx.exclude_seen)
            history.append({"epoch": epoch, "loss": total / max(n, 1), "valid_ndcg@10": metric})
            bar.advance(1, info=f"loss {total / max(n, 1):.3f} valid NDCG@10 {metric:.4f}")
            if metric > best:
                best, best_epoch, bad = metric, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= tc.patience:
                    break
            if cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s:
                stopped = "time budget"
                break
        else:
            stopped = "epochs"
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_valid": best,
        "stopped_by": stopped,
        "loss": "full softmax" if full else f"sampled softmax ({cfg.n_negatives} negatives, logQ)",
        "windows": len(wins),
        "seconds": time.perf_counter() - t0,
        "history": history,
    }


@register("retrieval", "sasrec")
@register("esr", "sasrec")
@register("lsr", "sasrec")
class SASRec(LearnedStage):
    """SASRec as retrieval, ESR or LSR (see the module docstring)."""

    name = "sasrec"
    kind = "ranker"
    config_class = SASRecConfig
    serving_fields = ("index", "nprobe", "ef_search")
    cache_name = f"sasrec-{MODEL_VERSION}"
    candidate_independent = True  # a candidate's score never depends on the other candidates

    def _window(self, ctx: FitContext) -> int:
        return ctx.train.max_len if self.config.max_len is None else self.config.max_len

    def build_model(self, ctx: FitContext) -> SASRecModel:
        return SASRecModel(ctx.dataset.n_items, self._window(ctx), self.config)

    def train_model(self, model: SASRecModel, ctx: FitContext) -> dict:
        cfg = self.config
        return search_settings(
            model, [{"dropout": p} for p in (cfg.dropout, *cfg.dropout_search)],
            lambda s: set_dropout(model, s["dropout"]),
            lambda s: train_sasrec(model, ctx, cfg, self._window(ctx),
                                   "sasrec" + (f", dropout {s['dropout']}" if s else "")))

    def prepare_serving(self, model: SASRecModel, ctx: FitContext) -> None:
        self.exclude_seen_ = ctx.exclude_seen
        self.item_vecs_ = model.items().detach()
        self.index_ = build_index(self.item_vecs_, ctx.index or self.config.index, self.config)

    @torch.no_grad()
    def user_vectors(self, batch: RequestBatch) -> Tensor:
        return self.fitted_model().user(batch.to(self.device_))

    @torch.no_grad()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        u = self.user_vectors(batch)
        v = self.item_vecs_[candidates.to(self.device_).clamp_min(0)]  # (B, K, D)
        return torch.einsum("bd,bkd->bk", u, v).float()

    @torch.no_grad()
    def score_all(self, batch: RequestBatch) -> Tensor:
        return (self.user_vectors(batch) @ self.item_vecs_.T).float()

    @torch.no_grad()
    def retrieve(self, batch: RequestBatch, k: int) -> Candidates:
        batch = batch.to(self.device_)
        u = self.user_vectors(batch)

        def search(user_vecs: Tensor, m: int) -> tuple[Tensor, Tensor]:
            scores, ids = index_search(self.index_, user_vecs, m, self.config.ef_search)
            return torch.from_numpy(ids).to(self.device_), torch.from_numpy(scores).to(self.device_)

        return search_with_exclusion(search, u, self.item_vecs_, batch, k, self.exclude_seen_)
