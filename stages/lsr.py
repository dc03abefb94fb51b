"""Late-stage ranker (LSR): target-aware attention over [history ; candidates], a generative
next-item head and DCN-v2 feature crossing. The heaviest model of the funnel.

- Sequence part (HSTU, Zhai et al., arXiv 2402.17152, with GESR's target mask, Hong et al.,
  arXiv 2511.21095): `cascade.stages.hstu.TargetAwareEncoder` over [history tokens ; candidate
  tokens]; history tokens are causal and never see candidates, each candidate sees the whole
  valid history and itself. So a request's history is encoded once (`encode_history`, K/V
  cached per layer) and any number of candidates is scored against it (`score_candidates`):
  removing or permuting the other candidates never changes a candidate's score.
- Tokens: history = item (id + features) + action code + absolute position; candidate = item +
  a learned marker + the position right after the history (hist_len), so attention can tell how
  recent each history event is relative to the candidate. Time gaps are left out [ours]: they
  are relative to the request time, which differs for every prefix of a training window (below),
  so using them would make training and serving disagree. History tokens (item + action) and
  candidates' item embeddings are multiplied by `token_scale`, and history tokens go through
  `token_dropout`; the pretraining phase
  chooses the pair by validation (`LSRConfig.token_search`; unit-scale tokens with dropout won
  on the sparse Toys file, the unscaled ones on ml-100k).
- Crossing part (DCN-v2, Wang et al., WWW 2021): x0 = [user (features + id embedding) ;
  candidate item ; the encoder's candidate output ; the encoder's output at the newest event ;
  explicit match counts (`features.MatchCounter`: history events sharing the candidate's
  category, overall and among the newest, and repeats of the candidate)], projected to `hidden`,
  then full-rank cross layers x_{l+1} = x0 * (W_l x_l + b_l) + x_l beside a deep MLP and a linear
  head over both.
- Score = that head + w <candidate output, item> / sqrt(D) + the generative score
  <q(newest output + user), k(item)> / temperature (HSTU's next-item retrieval head). The head's
  last layer and the scalar w start at zero, so the model first ranks by the generative score.
- Training (the efficiency trick the target mask allows): history tokens are causal, so the
  encoded window of N events contains the exact encoding of each of its prefixes. Each training
  window (`features.sequence_windows`) is encoded once and
  (1) `prefixes_per_window` random prefixes are scored against their next item and
  `n_negatives` sampled items (uniform plus popularity-sampled hard negatives), sampled softmax
  with the logQ correction (`rank_logq`);
  (2) the generative head predicts the next item after every history position at once against
  shared in-batch + uniform negatives (logQ-corrected, `next_item_weight`): dense, cheap signal
  that trains the encoder and item embeddings on every event. A catalogue of at most
  `full_softmax_items` items (or no larger than the sample) gets the full softmax instead: the
  exact loss, worth its cost on sparse logs (Klenitskiy & Vasilev, RecSys 2023).
  Before that joint phase, a pretraining phase (`pretrain`) trains on (2) alone, in full passes
  over the windows, early-stopped on the generative head's full-catalogue NDCG@10: without the
  per-pair work of (1) a window costs several times less, so a sparse log (short histories,
  many users) gets the ten-odd passes a next-item model needs before (1) trains the crossing.
  Early stopping on NDCG@10 re-ranking the generative head's top 100 (`validation`; or
  `sampled_mrr`): it tracks the full-catalogue metric the LSR is judged on, seen items left out
  when the run leaves them out (`FitContext.exclude_seen`). The user-id embedding is
  zero-initialised, so a user never seen in training (temporal split) falls back to features
  and history.
- Serving: `score(batch, candidates)` (the funnel) and `score_all(batch, chunk=...)` (every item,
  in chunks, for the full-catalogue reference metric) both encode the history once per request.
  When the joint phase kept the pretrained weights, the crossing head and the dot weight are
  exactly zero and scoring computes the generative score alone: the same scores, bit for bit,
  without the per-candidate encoder and DCN work (the fit report's `serves` says which).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.data.traffic import RequestBatch
from cascade.stages.hstu import HistoryState, TargetAwareEncoder
from cascade.stages.base import FitContext, register
from cascade.stages.features import (
    HistoryTokenEmbedder,
    ItemFeatureEmbedder,
    MatchCounter,
    ServingCache,
    UserFeatureEmbedder,
    catalogue_valid_requests,
    mean_batch_events,
    recent_history,
    sequence_windows,
    subsample,
)
from cascade.stages.negatives import NegativeSampler, shared_negative_softmax, softmax_kind
from cascade.stages.gather import dot_candidates
from cascade.stages.learned import LearnedStage
from cascade.stages.dcn import CrossNetwork
from cascade.stages.lsr_config import LSRConfig
from cascade.stages.lsr_validation import generative_ndcg, newest_output, next_keys, rerank_ndcg
from cascade.stages.training import fit_model, sampled_mrr, search_settings, set_dropout


class LSRModel(ServingCache):
    def __init__(self, ctx: FitContext, cfg: LSRConfig) -> None:
        super().__init__()
        ds = ctx.dataset
        d = cfg.dim
        self.width = ctx.train.max_len if cfg.max_len is None else min(cfg.max_len, ctx.train.max_len)
        self.items = ItemFeatureEmbedder(ds.items, ds.n_items, d)
        self.history = HistoryTokenEmbedder(self.items)  # item + action (gaps: see docstring)
        # absolute positions; a candidate sits at position hist_len, right after the history, so
        # attention can tell how recent each history event is relative to the candidate
        self.position = nn.Embedding(self.width + 1, d)
        # item tokens' scale and the history tokens' dropout (`LSRConfig.token_scale`): a buffer,
        # so a checkpoint keeps the scale the pretraining search chose
        self.register_buffer("token_scale", torch.tensor(float(cfg.token_scale)))
        self.token_drop = nn.Dropout(cfg.token_dropout)
        self.cand_marker = nn.Parameter(torch.zeros(d))
        self.user_feats = UserFeatureEmbedder(ds.users, d)
        # a user-id embedding carries what the user did before the history window; zero-
        # initialised, so a user never seen in training contributes nothing
        self.user_ids = nn.Embedding(ds.n_users, d) if cfg.user_id else None
        if self.user_ids is not None:
            nn.init.zeros_(self.user_ids.weight)
        self.matches = MatchCounter(ds.items, ds.category_feature, recent=cfg.match_recent)
        self.match_proj = nn.Linear(MatchCounter.n_features, d)
        self.encoder = TargetAwareEncoder(
            d, cfg.n_layers, cfg.n_heads, kind=cfg.attention, dropout=cfg.dropout, impl=cfg.impl
        )
        # x0 = [user; item; candidate output; newest history output] (4D) projected to `hidden`:
        # the crossing then costs O(hidden^2) per candidate instead of O(16 D^2)
        self.x0 = nn.Sequential(nn.LayerNorm(5 * d), nn.Linear(5 * d, cfg.hidden))
        self.cross = CrossNetwork(cfg.hidden, cfg.n_cross)
        self.deep = nn.Sequential(
            nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
            nn.Linear(cfg.hidden, cfg.hidden // 2), nn.GELU(),
        )
        self.head = nn.Linear(cfg.hidden + cfg.hidden // 2, 1)
        self.dot_scale = 1.0 / math.sqrt(d)
        # the crossing head and the candidate-output dot start at zero: an untrained (or only
        # pretrained) model scores by its generative head alone, and the joint phase adds to it
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.dot_weight = nn.Parameter(torch.zeros(()))
        self.next_proj = nn.Linear(d, d)  # history output -> next-item query (generative path)
        self.next_item = nn.Linear(d, d)  # item embedding -> next-item key
        self.inv_temp = 1.0 / cfg.temperature
        nn.init.normal_(self.position.weight, std=0.02)

    # -- tokens ------------------------------------------------------------------------------
    def history_tokens(self, batch: RequestBatch) -> Tensor:
        """(B, N, D) history tokens, 0 at padding (positions are absolute: see docstring)."""
        gaps = torch.zeros_like(batch.hist_gaps)  # code 0 embeds to zero
        x = self.token_drop(self.history.embed(batch.hist_items, batch.hist_actions, gaps, batch.hist_len)
                            * self.token_scale)
        n = x.shape[1]
        return x + self.position.weight[:n] * batch.hist_mask[..., None].to(x.dtype)

    def candidate_tokens(self, item: Tensor, hist_len: Tensor) -> Tensor:
        """(B, n, D) item embeddings -> candidate tokens: scaled as history tokens, + marker +
        the position hist_len."""
        return item * self.token_scale + self.cand_marker + self.position(hist_len)[:, None, :]

    def set_tokens(self, *, dropout: float, token_scale: float, token_dropout: float) -> None:
        """A pretraining setting: every dropout rate to `dropout`, then the token scale and the
        history tokens' dropout."""
        set_dropout(self, dropout)
        self.token_drop.p = token_dropout
        self.token_scale.fill_(token_scale)

    def encode(self, batch: RequestBatch) -> "Encoded":
        """History through the encoder once; what scoring any candidates needs."""
        state = self.encoder.encode_history(self.history_tokens(batch), batch.hist_len)
        return Encoded(state, self.user(batch), batch.hist_items, batch.hist_actions)

    def user(self, batch: RequestBatch) -> Tensor:
        """(B, D): user features (+ user id)."""
        u = self.user_feats(batch.user_feats)
        return u if self.user_ids is None else u + self.user_ids(batch.user)

    def next_query(self, hist_out: Tensor) -> Tensor:
        """(..., D) history outputs -> unit-norm next-item queries."""
        return F.normalize(self.next_proj(hist_out), dim=-1)

    def next_key(self, item: Tensor) -> Tensor:
        """(..., D) item embeddings -> unit-norm next-item keys."""
        return F.normalize(item + self.next_item(item), dim=-1)

    def catalogue_keys(self, device: torch.device) -> Tensor:
        """(n_items, D) every item's next-item key for serving (`ServingCache`)."""
        return self.serving_cached("keys", lambda: next_keys(self, device))

    def generative_query(self, enc: "Encoded") -> Tensor:
        """(B, D) unit next-item queries of encoded requests: newest output + user."""
        return self.next_query(newest_output(enc.state.output, enc.state.hist_len) + enc.user)

    def generative(self, query: Tensor, candidates: Tensor, item: Tensor | None) -> Tensor:
        """(B, n) generative scores of the candidates for unit queries (B, D). In training, from
        the candidates' embeddings `item` (or their ids); in eval mode without autograd, from the
        catalogue's keys, computed once (`gather.dot_candidates`)."""
        if self.training or torch.is_grad_enabled():
            keys = self.next_key(self.items(candidates) if item is None else item)
            return self.inv_temp * (query[:, None] * keys).sum(-1)
        keys = self.catalogue_keys(candidates.device)
        return self.inv_temp * dot_candidates(query, keys, candidates)

    def crossing_is_zero(self) -> bool:
        """True when the crossing head and the candidate-output dot contribute exactly 0 to every
        score (both start at zero; the joint phase kept its starting weights)."""
        return not (self.head.weight.any() or self.head.bias.any() or self.dot_weight.item())

    def score_with(self, enc: "Encoded", candidates: Tensor, *, full: bool = False) -> Tensor:
        """Candidates (B, n) against an encoded history -> (B, n) logits. Outside autograd, when
        the crossing contributes exactly 0 (`crossing_is_zero`), only the generative score is
        computed: the same logits, bit for bit, without the per-candidate encoder and DCN work;
        `full` computes every part anyway (tests)."""
        hist_len = enc.state.hist_len
        if not (full or torch.is_grad_enabled()) and self.crossing_is_zero():
            return self.generative(self.generative_query(enc), candidates, None)
        item = self.items(candidates)  # (B, n, D)
        out = self.encoder.score_candidates(enc.state, self.candidate_tokens(item, hist_len))
        return self.head_logits(enc.user, enc.hist_items, enc.hist_actions, hist_len, candidates,
                                item, out, enc.state.output)

    def head_logits(
        self, user: Tensor, hist_items: Tensor, hist_actions: Tensor, hist_len: Tensor,
        candidates: Tensor, item: Tensor, out: Tensor, hist_out: Tensor,
    ) -> Tensor:
        """DCN-v2 crossing + deep MLP + the direct dot products -> (B, n) logits."""
        newest = newest_output(hist_out, hist_len)  # (B, D)
        n = item.shape[1]
        counts = self.matches(hist_items, hist_actions, hist_len, candidates)  # (B, n, 4)
        x0 = torch.cat(
            [
                user[:, None].expand(-1, n, -1),
                item,
                out,
                newest[:, None].expand(-1, n, -1),
                self.match_proj(counts),
            ],
            -1,
        )
        x0 = self.x0(x0)  # (B, n, hidden)
        logit = self.head(torch.cat([self.cross(x0), self.deep(x0)], -1)).squeeze(-1)
        query = self.next_query(newest + user)  # (B, D)
        generative = self.generative(query, candidates, item)
        return logit + self.dot_weight * self.dot_scale * (out * item).sum(-1) + generative

    def forward(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        return self.score_with(self.encode(batch), candidates)

    def forward_naive(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """The same score with one full [history ; candidate] sequence per candidate through
        `TargetAwareEncoder.forward_naive`: the definition the cached path must equal."""
        hist = self.history_tokens(batch)
        item = self.items(candidates)
        out = self.encoder.forward_naive(hist, batch.hist_len, self.candidate_tokens(item, batch.hist_len))
        hist_out, _ = self.encoder(hist, batch.hist_len, item[:, :0])  # history, no candidates
        user = self.user(batch)
        return self.head_logits(user, batch.hist_items, batch.hist_actions, batch.hist_len,
                                candidates, item, out, hist_out)


def event_sequence(batch: RequestBatch) -> Tensor:
    """(B, N+1): each window's history followed by its target, at position hist_len (so column
    j + 1 is the item after history event j, what the history output at j predicts)."""
    nxt = torch.cat([batch.hist_items, batch.targets[:, :1]], 1)
    return nxt.scatter(1, batch.hist_len[:, None], batch.targets[:, :1])


@dataclass(frozen=True)
class Encoded:
    """A batch's encoded history, user features and raw history codes: all that scoring any
    number of candidates for these requests needs."""

    state: HistoryState  # per-layer history K/V, outputs (B, N, D), hist_len (B,)
    user: Tensor  # (B, D) user-feature embedding
    hist_items: Tensor  # (B, N) for the match counts
    hist_actions: Tensor  # (B, N)

    def prefixes(self, rows: Tensor, lengths: Tensor) -> "Encoded":
        """The encoding of the first `lengths[i]` events of request `rows[i]`: exact, because
        history tokens are causal (a prefix's K/V and outputs do not depend on later events)."""
        state = replace(self.state.select(rows), hist_len=lengths)
        return Encoded(state, self.user[rows], self.hist_items[rows], self.hist_actions[rows])


SCORE_GROUP = 64  # serving on CPU: requests encoded together (`LateStageRanker.score`)
# on a GPU, larger: each group costs the same kernel launches whatever its size, and those set
# the time there (ml-100k, 256 x 60 in 4 groups: 34 ms per batch on an H200)
SCORE_GROUP_GPU = 1024


@register("lsr", "lsr")
class LateStageRanker(LearnedStage):
    """Target-aware attention + DCN-v2 late-stage ranker (see the module docstring)."""

    name = "lsr"
    kind = "lsr"
    config_class = LSRConfig
    serving_fields = ("score_chunk", "quantize")
    cache_name = "lsr"
    candidate_independent = True  # the target mask: candidates never see each other
    float_linears = ("head", "encoder.layers.*.proj")  # kept float32 by int8: stages/quantize.py

    def build_model(self, ctx: FitContext) -> LSRModel:
        return LSRModel(ctx, self.config)

    def train_model(self, model: LSRModel, ctx: FitContext) -> dict:
        cfg = self.config
        n_items = ctx.dataset.n_items
        counts = np.bincount(ctx.train.targets[:, 0], minlength=n_items)
        sampler = NegativeSampler(counts, pop_frac=cfg.pop_negatives, device=ctx.device)
        freq = torch.as_tensor(counts / max(counts.sum(), 1), dtype=torch.float32, device=ctx.device)
        windows = sequence_windows(ctx.train, model.width)
        # rerank_ndcg scores the whole catalogue with the generative head: fewer requests on a
        # huge one (sampled_mrr does not, but keeps the same requests)
        valid = subsample(ctx.valid, catalogue_valid_requests(cfg.valid_requests, n_items))
        r = cfg.prefixes_per_window

        def loss_fn(batch: RequestBatch, gen: torch.Generator) -> Tensor:
            batch = recent_history(batch, model.width)
            enc = model.encode(batch)
            b = len(batch)
            rows = torch.arange(b, device=ctx.device).repeat_interleave(r)  # (B*R,)
            # prefix length l in 1..hist_len predicts event l (the window's target when l = len)
            frac = torch.rand(b * r, generator=gen).to(ctx.device)
            lens = (frac * batch.hist_len[rows]).long() + 1  # (B*R,)
            nxt = event_sequence(batch)  # (B, N+1)
            pos = nxt[rows, lens][:, None]  # (B*R, 1)
            neg = sampler.sample(b * r, cfg.n_negatives, gen)  # (B*R, n)
            cand = torch.cat([pos, neg], 1)
            logits = model.score_with(enc.prefixes(rows, lens), cand)
            if cfg.rank_logq:
                logits = logits - cfg.rank_logq * sampler.log_q(cand, cfg.n_negatives)
            hit = torch.cat([torch.zeros_like(pos, dtype=torch.bool), neg == pos], 1)
            logits = logits.masked_fill(hit, -math.inf)  # a sampled positive is no negative
            rank_loss = F.cross_entropy(logits, torch.zeros(b * r, dtype=torch.long, device=ctx.device))
            if cfg.next_item_weight == 0:
                return rank_loss
            return rank_loss + cfg.next_item_weight * next_item_loss(enc.state.output, nxt[:, 1:], batch, gen)

        full_softmax, loss_name = softmax_kind(
            n_items, cfg.full_softmax_items, cfg.in_batch_negatives + cfg.n_uniform_negatives)

        def next_item_loss(hist_out: Tensor, nxt: Tensor, batch: RequestBatch, gen) -> Tensor:
            # HSTU's generative objective: the history output after event j predicts event j+1,
            # at every position at once, against shared in-batch + uniform negatives (logQ)
            valid = batch.hist_mask
            user = model.user(batch)[:, None, :].expand_as(hist_out)
            if full_softmax:  # a small catalogue: score it all, exactly
                keys = model.next_key(model.items(torch.arange(n_items, device=ctx.device)))
                query = model.next_query((hist_out + user)[valid])
                return F.cross_entropy(model.inv_temp * query @ keys.T, nxt[valid])
            return shared_negative_softmax(
                model.next_query((hist_out + user)[valid]),
                nxt[valid],
                lambda ids: model.next_key(model.items(ids)),
                freq,
                gen,
                n_in_batch=cfg.in_batch_negatives,
                n_uniform=cfg.n_uniform_negatives,
                inv_temp=model.inv_temp,
            )

        # pretraining batches hold windows of similar length (far less padding); each event
        # keeps the weight it has in uniformly drawn batches: a batch's mean loss is scaled by
        # its event count over the mean count of a batch
        per_batch = mean_batch_events(windows, model.width, cfg.pretrain.batch_size if cfg.pretrain else 1)

        def next_item_only(batch: RequestBatch, gen: torch.Generator) -> Tensor:
            batch = recent_history(batch, model.width)
            enc = model.encode(batch)
            events = batch.hist_len.sum().float()
            return next_item_loss(enc.state.output, event_sequence(batch)[:, 1:], batch, gen) * (
                events / per_batch)

        def valid_fn() -> float:
            if cfg.validation == "sampled_mrr":
                return sampled_mrr(
                    lambda b, c: model(recent_history(b, model.width), c), valid, ctx.device,
                    seed=ctx.seed,
                )
            return rerank_ndcg(model, valid, cfg.valid_candidates, ctx.exclude_seen, ctx.device)

        first = None
        if cfg.pretrain is not None and cfg.next_item_weight > 0:
            # the pretraining phase once per setting (dropout rate, token scale and dropout), the
            # best-validating kept with its weights
            first = search_settings(model, cfg.pretrain_settings(), lambda s: model.set_tokens(**s),
                                    lambda s: fit_model(
                model, next_item_only,
                lambda: generative_ndcg(model, valid, ctx.exclude_seen, ctx.device),
                ctx, cfg.pretrain, desc="lsr next-item" + (
                    ", " + ", ".join(f"{k} {v:g}" for k, v in s.items()) if s else ""),
                train=windows,
            ), times=("seconds", "train_step_s", "optimizer_s"))
        report = fit_model(model, loss_fn, valid_fn, ctx, cfg.train, desc="lsr", train=windows,
                           validate_first=first is not None)
        if first is not None:
            report["pretrain"] = {k: v for k, v in first.items() if k != "history"}
            report["seconds"] += first["seconds"]
        report["serves"] = "generative head" if model.crossing_is_zero() else "full model"
        report["next_item_loss"] = loss_name
        return report

    @torch.no_grad()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """candidates (B, K) int64 -> (B, K) float32; the history is encoded once per request and
        the candidates scored against it in chunks of `score_chunk`. Requests go in groups of
        `SCORE_GROUP` (`SCORE_GROUP_GPU` on a GPU) of similar history length, each cut to its
        longest history, so the encoder spans real events rather than the batch's padding (the
        same scores)."""
        model = self.fitted_model()
        batch = recent_history(batch.to(self.device_), model.width)
        c = candidates.to(self.device_)
        out = torch.empty(c.shape, dtype=torch.float32, device=c.device)
        step = self.config.score_chunk
        size = SCORE_GROUP if c.device.type == "cpu" else SCORE_GROUP_GPU
        for rows, group in batch.length_groups(size):
            enc, cr = model.encode(group), c[rows]
            out[rows] = torch.cat([model.score_with(enc, cr[:, s : s + step])
                                   for s in range(0, cr.shape[1], step)], dim=1).float()
        return out

    @torch.no_grad()
    def score_all(self, batch: RequestBatch, chunk: int | None = None) -> Tensor:
        """(B, n_items) float32 scores of every item (the full-catalogue reference)."""
        model = self.fitted_model()
        step = chunk or self.config.score_chunk
        if step < 1:
            raise ValueError(f"score_all: chunk must be >= 1, got {step}")
        batch = recent_history(batch.to(self.device_), model.width)
        enc = model.encode(batch)
        n = model.items.n_items
        if model.crossing_is_zero():  # the generative head alone: one product per chunk of keys
            query = model.generative_query(enc)
            keys = model.catalogue_keys(self.device_)
            return torch.cat([model.inv_temp * (query @ keys[s : s + step].T)
                              for s in range(0, n, step)], dim=1).float()
        parts = []
        for s in range(0, n, step):
            ids = torch.arange(s, min(s + step, n), device=self.device_)
            parts.append(model.score_with(enc, ids[None, :].expand(len(batch), -1)))
        return torch.cat(parts, dim=1).float()

    @torch.no_grad()
    def score_naive(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """Reference scoring through `forward_naive` (one sequence per candidate); tests only."""
        model = self.fitted_model()
        batch = recent_history(batch.to(self.device_), model.width)
        return model.forward_naive(batch, candidates.to(self.device_)).float()
