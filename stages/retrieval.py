"""Two-tower retrieval over a real FAISS index: the first stage of the funnel.

Follows the sampling-bias-corrected two-tower model (Yi et al., "Sampling-Bias-Corrected Neural
Modeling for Large Corpus Item Recommendations", RecSys 2019) with mixed negatives (Yang et al.,
"Mixed Negative Sampling for Learning Two-tower Neural Networks", WWW 2020), and a SASRec-style
user encoder (Kang & McAuley, ICDM 2018):

- user tower: [user-feature token ; history tokens] through a small causal Transformer with
  absolute positions; the output after the newest history event is the user vector. History
  tokens (item + action, `cascade.stages.features`) share the item embedding with the item tower.
  Time gaps are left out [ours]: they are relative to the request time, which differs for every
  prefix of a training window (below), so they would make training and serving disagree.
- item tower: item id + item features, plus a residual MLP.
- both outputs are L2-normalised and scored by inner product / temperature. Why normalised:
  cosine scores keep sampled-softmax training stable (no norm blow-up of popular items), the
  temperature sets the logit range explicitly, and inner product over unit vectors is the metric
  the FAISS index searches, so training and serving agree exactly.
- training examples: SASRec-style, every prefix of every training window is one example (the
  causal encoder gives all prefixes of a window in one pass; `sequence_windows` picks windows so
  each training event is a target exactly once): ~width times less encoder work than encoding
  one request per event. Batches hold windows of similar history length, trimmed to their
  longest (`TrainConfig.length_batches`), each batch's loss scaled by its event count over the
  mean (`features.mean_batch_events`): a log of mostly short histories pays little for padding,
  and every event weighs what it weighs in uniformly drawn batches.
- loss: sampled softmax against shared negatives: `in_batch_negatives` drawn from the batch's
  positives (in-batch negatives) plus `n_uniform_negatives` uniform items. Every logit is
  corrected by log Q(j), Q(j) = S*f_j + M/n_items the expected number of times item j is drawn
  (f_j = its empirical frequency as a training target): the logQ correction for in-batch
  sampling, made exact for the mixture with uniform sampling.
- serving: item vectors are computed once after fitting (or loading the cached checkpoint) and
  added to `faiss.index_factory(dim, index, METRIC_INNER_PRODUCT)` (trained first when the index
  needs it, e.g. IVF), `index` being the run's (`FitContext.index`) or else the config's.
  `retrieve` searches all requests of a batch in one call, over-fetching by the history width so
  that, when the run excludes seen items (`FitContext.exclude_seen`), dropping history items
  still leaves k. An HNSW index searches with efSearch at least the number fetched
  (`index_search`). Rows the index cannot fill (an IVF probing too few lists) are answered by an exact
  search over the cached item vectors, so `retrieve` returns exactly k ids per request; only when
  fewer than k unseen items exist at all are the last columns -1 (score -inf).
- early stopping: full-catalogue recall@`valid_k` on validation requests (exact matmul top-k,
  seen items excluded as the run excludes them).
- caching: the checkpoint key leaves out the serving-only fields (index, nprobe, ef_search), so
  trying another index reuses the trained towers and only rebuilds the FAISS index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.data.traffic import RequestBatch, Traffic
from cascade.stages.base import Candidates, FitContext, StageError, register
from cascade.stages.features import (
    HistoryTokenEmbedder,
    ItemFeatureEmbedder,
    UserFeatureEmbedder,
    exclude_history_,
    mean_batch_events,
    recent_history,
    sequence_windows,
    catalogue_valid_requests,
    subsample,
)
from cascade.stages.negatives import shared_negative_softmax
from cascade.stages.learned import LearnedStage
from cascade.stages.training import TrainConfig, fit_model

INDEX_EXAMPLES = ("Flat", "IVF64,Flat", "IVF256,PQ16", "HNSW32", "PCA32,Flat")


def validate_index_spec(spec: str, dim: int) -> None:
    """Raise ValueError unless `spec` is a FAISS index_factory string usable at `dim`."""
    import faiss

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"index must be a FAISS index_factory string, got {spec!r}")
    try:
        faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError with a C++ trace
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"index {spec!r} is not a FAISS index_factory string usable at dim={dim} ({first}); "
            f"examples: {', '.join(INDEX_EXAMPLES)}"
        ) from None


@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    dim: int = 64
    n_layers: int = 1
    n_heads: int = 2
    dropout: float = 0.1
    max_len: int | None = None  # use at most this many recent history events (None: all given)
    # faiss.index_factory string: "Flat", "IVF64,Flat", "HNSW32", ...; the run's index
    # (FitContext.index) overrides it
    index: str = "Flat"
    nprobe: int = 16  # IVF indexes: lists probed per query
    ef_search: int = 128  # HNSW indexes: search breadth
    in_batch_negatives: int = 512  # negatives drawn from the batch's positives
    n_uniform_negatives: int = 512
    temperature: float = 0.07
    valid_k: int = 100  # early stopping on full-catalogue recall@k, k = min(valid_k, 5% of items)
    valid_requests: int = 2000  # at most this many validation requests per check
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            # up to 20 epochs (was 9, where ml-100k still improved: validation recall 0.606 at
            # epoch 8 of 9 -> 0.629 at 12 of 15; test HR@10 0.168 -> 0.170; Toys stops at 7)
            epochs=20, batch_size=128, lr=3e-3, patience=2, max_steps_per_epoch=100,
            # windows of similar length, each batch's loss weighted by its event count. Amazon
            # Toys (median history 3 of a width of 50), one thread: fit 205 s -> 55 s, test
            # HR@10 / NDCG@10 / recall@1000 0.0755 / 0.0442 / 0.497 -> 0.0760 / 0.0439 / 0.506
            length_batches=True,
        )
    )

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "nprobe", "ef_search", "valid_k", "valid_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"RetrievalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"RetrievalConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RetrievalConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"RetrievalConfig.max_len must be >= 1 or None, got {self.max_len}")
        if self.in_batch_negatives < 0 or self.n_uniform_negatives < 0:
            raise ValueError(
                "RetrievalConfig.in_batch_negatives and n_uniform_negatives must be >= 0, got "
                f"{self.in_batch_negatives} and {self.n_uniform_negatives}"
            )
        if not self.temperature > 0:
            raise ValueError(f"RetrievalConfig.temperature must be > 0, got {self.temperature}")
        if not isinstance(self.train, TrainConfig):
            raise ValueError("RetrievalConfig.train must be a TrainConfig")
        validate_index_spec(self.index, self.dim)


class RetrievalModel(nn.Module):
    """The two towers; `user(batch) -> (B, D)` and `item(ids) -> (*, D)`, both unit-norm."""

    def __init__(self, ctx: FitContext, cfg: RetrievalConfig) -> None:
        super().__init__()
        ds = ctx.dataset
        d = cfg.dim
        self.max_len = cfg.max_len
        self.width = ctx.train.max_len if cfg.max_len is None else min(cfg.max_len, ctx.train.max_len)
        self.items = ItemFeatureEmbedder(ds.items, ds.n_items, d)
        self.history = HistoryTokenEmbedder(self.items)  # item + action; gaps left out (doc)
        self.user_feats = UserFeatureEmbedder(ds.users, d)
        self.user_token = nn.Parameter(torch.zeros(d))  # so users without features still work
        self.position = nn.Embedding(self.width + 1, d)  # absolute, 0 = the user token
        nn.init.normal_(self.position.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d, cfg.n_heads, dim_feedforward=2 * d, dropout=cfg.dropout, batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.user_out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.item_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def encode(self, batch: RequestBatch) -> Tensor:
        """(B, N+1, D) unit-norm user vectors after each prefix: position 0 has seen only the
        user features, position j+1 the history events 0..j. Causal, so position j+1 does not
        depend on later events: one pass gives every prefix's vector (used for training)."""
        first = (self.user_token + self.user_feats(batch.user_feats))[:, None, :]  # (B, 1, D)
        gaps = torch.zeros_like(batch.hist_gaps)  # code 0: the gap embedding contributes nothing
        hist = self.history.embed(batch.hist_items, batch.hist_actions, gaps, batch.hist_len)
        x = torch.cat([first, hist], dim=1)  # (B, N+1, D)
        x = x + self.position.weight[: x.shape[1]]
        # right padding + causal mask: valid positions never attend padding, so no key mask
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        h = self.encoder(x, mask=causal, is_causal=True)
        return F.normalize(self.user_out(h), dim=-1)

    def user(self, batch: RequestBatch) -> Tensor:
        batch = recent_history(batch, self.width)
        h = self.encode(batch)  # (B, N+1, D)
        return h[torch.arange(h.shape[0], device=h.device), batch.hist_len]  # after the newest

    def item(self, ids: Tensor) -> Tensor:
        e = self.items(ids)
        return F.normalize(e + self.item_mlp(e), dim=-1)

    @torch.no_grad()
    def all_items(self, chunk: int = 65536) -> Tensor:
        n = self.items.n_items
        dev = self.user_token.device
        return torch.cat(
            [self.item(torch.arange(s, min(s + chunk, n), device=dev)) for s in range(0, n, chunk)]
        )


def mask_seen(ids: Tensor, batch: RequestBatch) -> Tensor:
    """(B, M) candidate ids -> (B, M) bool, True where the id is in the request's history."""
    hist = torch.where(batch.hist_mask, batch.hist_items, torch.full_like(batch.hist_items, -2))
    return (ids[:, :, None] == hist[:, None, :]).any(-1)


def take_valid(ids: Tensor, scores: Tensor, invalid: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each row's first k ids that are not `invalid`, in order. Returns ids (B, k) padded
    with -1, scores (B, k) padded with -inf, and the number of valid ids per row (B,)."""
    invalid = invalid | (ids < 0)
    order = torch.sort(invalid.to(torch.int8), dim=1, stable=True).indices  # valid first
    ids, scores, invalid = (t.gather(1, order) for t in (ids, scores, invalid))
    if ids.shape[1] < k:  # fewer fetched than asked for: pad
        pad = k - ids.shape[1]
        ids = F.pad(ids, (0, pad), value=-1)
        scores = F.pad(scores, (0, pad), value=-math.inf)
        invalid = F.pad(invalid, (0, pad), value=True)
    ids, scores, invalid = ids[:, :k], scores[:, :k], invalid[:, :k]
    ids = ids.masked_fill(invalid, -1)
    scores = scores.masked_fill(invalid, -math.inf)
    return ids, scores, (~invalid).sum(1)


def n_distinct_seen(batch: RequestBatch) -> Tensor:
    """(B,) number of distinct items in each request's valid history."""
    h = torch.where(batch.hist_mask, batch.hist_items, torch.full_like(batch.hist_items, -1))
    h = h.sort(dim=1).values
    if h.shape[1] == 0:
        return torch.zeros(len(batch), dtype=torch.int64, device=h.device)
    new = torch.cat([h[:, :1] >= 0, (h[:, 1:] != h[:, :-1]) & (h[:, 1:] >= 0)], dim=1)
    return new.sum(1)


def exact_top_k(
    user_vecs: Tensor, item_vecs: Tensor, batch: RequestBatch, k: int, exclude_seen: bool
) -> tuple[Tensor, Tensor]:
    """Brute-force inner-product top-k over all items (seen items removed when asked), in row
    chunks so a large catalogue never makes a (B, n_items) matrix bigger than 32M entries."""
    n_items = item_vecs.shape[0]
    step = max(1, (1 << 25) // max(n_items, 1))
    out_ids, out_scores = [], []
    for s in range(0, len(batch), step):
        rows = torch.arange(s, min(s + step, len(batch)), device=user_vecs.device)
        scores = user_vecs[rows] @ item_vecs.T  # (b, n_items)
        if exclude_seen:
            exclude_history_(scores, batch.select(rows))
        top = scores.topk(min(k, n_items), dim=1)
        ids, sc, _ = take_valid(top.indices, top.values, ~torch.isfinite(top.values), k)
        out_ids.append(ids)
        out_scores.append(sc)
    return torch.cat(out_ids), torch.cat(out_scores)


def search_with_exclusion(
    search, user_vecs: Tensor, item_vecs: Tensor, batch: RequestBatch, k: int, exclude_seen: bool
) -> Candidates:
    """Shared by every retriever: `search(user_vecs, m) -> (ids, scores)` fetches m per row;
    over-fetch by the history width, drop seen items, fall back to exact search for short rows."""
    over = batch.hist_items.shape[1] if exclude_seen else 0
    m = min(k + over, item_vecs.shape[0])
    ids, scores = search(user_vecs, m)
    invalid = mask_seen(ids, batch) if exclude_seen else torch.zeros_like(ids, dtype=torch.bool)
    ids, scores, n_valid = take_valid(ids, scores, invalid, k)
    n_items = item_vecs.shape[0]
    available = n_items - n_distinct_seen(batch) if exclude_seen else torch.full_like(n_valid, n_items)
    short = n_valid < available.clamp(max=k)
    if short.any():
        rows = short.nonzero().squeeze(1)
        sub = batch.select(rows)
        ids[rows], scores[rows] = exact_top_k(user_vecs[rows], item_vecs, sub, k, exclude_seen)
    return Candidates(ids=ids, scores=scores.float())


@register("retrieval", "twotower")
class TwoTowerRetriever(LearnedStage):
    """Sequence-aware two-tower retrieval with a FAISS index (see the module docstring)."""

    name = "twotower"
    kind = "retrieval"
    config_class = RetrievalConfig
    serving_fields = ("index", "nprobe", "ef_search")
    candidate_independent = True  # `score`: one dot product per candidate

    index_ = None  # the FAISS index over item_vecs_
    item_vecs_: Tensor | None = None  # (n_items, D) on the device
    exclude_seen_: bool | None = None  # the run's: retrieve drops history items

    # -- training ---------------------------------------------------------------------------
    def build_model(self, ctx: FitContext) -> RetrievalModel:
        return RetrievalModel(ctx, self.config)

    def train_model(self, model: RetrievalModel, ctx: FitContext) -> dict:
        cfg = self.config
        n_items = ctx.dataset.n_items
        freq = np.bincount(ctx.train.targets[:, 0], minlength=n_items).astype(np.float64)
        freq = torch.as_tensor(freq / max(freq.sum(), 1.0), dtype=torch.float32, device=ctx.device)
        valid = subsample(ctx.valid, catalogue_valid_requests(cfg.valid_requests, n_items))
        windows = sequence_windows(ctx.train, model.width)
        events_per_batch = mean_batch_events(windows, model.width, cfg.train.batch_size)

        def loss_fn(batch: RequestBatch, gen: torch.Generator) -> Tensor:
            # every prefix of every window is one example (see `sequence_windows`)
            batch = recent_history(batch, model.width)
            u = model.encode(batch)[:, 1:]  # (B, N, D): after events 0..j
            tgt = torch.cat([batch.hist_items[:, 1:], batch.targets[:, :1]], dim=1)  # (B, N)
            last = (batch.hist_len - 1).clamp_min(0)
            tgt = tgt.scatter(1, last[:, None], batch.targets[:, :1])  # the window's own target
            valid = batch.hist_mask  # (B, N)
            scale = valid.sum() / events_per_batch if cfg.train.length_batches else 1.0
            return scale * shared_negative_softmax(
                u[valid],
                tgt[valid],
                model.item,
                freq,
                gen,
                n_in_batch=cfg.in_batch_negatives,
                n_uniform=cfg.n_uniform_negatives,
                inv_temp=1.0 / cfg.temperature,
            )

        # recall@k is uninformative when k is a large share of the catalogue: cap k at 5%
        valid_k = min(cfg.valid_k, max(10, n_items // 20))

        def valid_fn() -> float:
            return recall(model, valid, valid_k, ctx.exclude_seen, ctx.device)

        return fit_model(
            model, loss_fn, valid_fn, ctx, cfg.train, desc="retrieval twotower", train=windows
        )

    def prepare_serving(self, model: RetrievalModel, ctx: FitContext) -> None:
        spec = self.config.index if ctx.index is None else ctx.index
        if ctx.index is not None:
            try:
                validate_index_spec(spec, self.config.dim)
            except ValueError as e:
                raise StageError(f"retrieval stage {self.name!r}: {e}") from None
        self.item_vecs_ = model.all_items()
        self.index_ = build_index(self.item_vecs_, spec, self.config)
        self.exclude_seen_ = ctx.exclude_seen

    # -- serving ----------------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, batch: RequestBatch) -> Tensor:
        return self.fitted_model().user(batch.to(self.device_))

    @torch.no_grad()
    def retrieve(self, batch: RequestBatch, k: int) -> Candidates:
        """(B,) requests -> exactly k candidate ids per request, best first (see module doc)."""
        if k < 1:
            raise ValueError(f"retrieve: k must be >= 1, got {k}")
        model = self.fitted_model()
        batch = batch.to(self.device_)
        u = model.user(batch)

        def search(user_vecs: Tensor, m: int) -> tuple[Tensor, Tensor]:
            scores, ids = index_search(self.index_, user_vecs, m, self.config.ef_search)
            return (
                torch.from_numpy(ids).to(self.device_),
                torch.from_numpy(scores).to(self.device_),
            )

        return search_with_exclusion(search, u, self.item_vecs_, batch, k, self.exclude_seen_)

    @torch.no_grad()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """Inner products of the two towers for given candidates: (B, K) -> (B, K) float32."""
        u = self.user_vectors(batch)
        v = self.item_vecs_[candidates.to(self.device_)]  # (B, K, D)
        return torch.einsum("bd,bkd->bk", u, v).float()


@torch.no_grad()
def recall(
    model: RetrievalModel, traffic: Traffic, k: int, exclude_seen: bool, device: torch.device
) -> float:
    """Full-catalogue recall@k of the first target (exact matmul; seen items excluded when the
    run excludes them)."""
    model.eval()
    item_vecs = model.all_items()
    chunk = max(1, min(1024, (1 << 25) // max(item_vecs.shape[0], 1)))
    hits, count = 0.0, 0
    for batch in traffic.batches(chunk):
        batch = batch.to(device)
        ids, _ = exact_top_k(model.user(batch), item_vecs, batch, k, exclude_seen)
        hits += float((ids == batch.targets[:, :1]).any(1).sum())
        count += len(batch)
    return hits / max(count, 1)


# FAISS's exhaustive search (`Flat`) computes a batch's inner products by BLAS matrix products
# only from this many queries up; below, one query at a time by SIMD loops. faiss-cpu 1.15.1
# here reports a threshold of 128,000 queries, so a batch of 256 never took the BLAS path. 256 queries,
# k = 1,050, 64-d, 2 threads: 1M items 1,148 -> 222 ms, 100k 124 -> 47 ms, 11,924 items 32.5 ->
# 20.7 ms, 1,682 items (k = 300) 6.7 -> 4.8 ms. The ids are the same up to float rounding: a
# product summed in another order can swap two near-tied items at the k-th place (0.24% of
# the ids differed at 100k and 1M random vectors, none below).
FAISS_BLAS_MIN_QUERIES = 20


def index_search(index, user_vecs: Tensor, m: int, ef_search: int) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` of m per row: (scores, ids). An HNSW index searches with efSearch at least
    m: below m it returns fewer than m ids (FAISS's HNSW stops at efSearch candidates), which
    loses recall and sends the rows to the exact fallback. Exhaustive search takes FAISS's
    BLAS path from `FAISS_BLAS_MIN_QUERIES` queries (a process-wide FAISS setting)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_MIN_QUERIES
    q = np.ascontiguousarray(user_vecs.float().cpu().numpy())
    if ef_search < m and isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = m
        return index.search(q, m, params=params)
    return index.search(q, m)


def build_index(item_vecs: Tensor, spec: str, cfg: RetrievalConfig):
    """`faiss.index_factory(dim, spec)` over `item_vecs` (n_items, D), trained when the index
    needs it, with `cfg`'s search parameters (nprobe, efSearch)."""
    import faiss

    vecs = np.ascontiguousarray(item_vecs.float().cpu().numpy())
    index = faiss.index_factory(vecs.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        try:
            index.train(vecs)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1]
            raise StageError(
                f"retrieval index {spec!r} cannot be trained on {len(vecs)} item vectors "
                f"({msg}); choose fewer IVF lists or 'Flat'"
            ) from None
    index.add(vecs)
    params = faiss.ParameterSpace()
    if faiss.try_extract_index_ivf(index) is not None:
        params.set_index_parameter(index, "nprobe", cfg.nprobe)
    if "HNSW" in spec:
        params.set_index_parameter(index, "efSearch", max(cfg.ef_search, 1))
    return index
