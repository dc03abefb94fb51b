"""Synthetic interaction logs with a known ground-truth affinity: the default data of
`cascade run` and the test bed for every stage.

The world
- Items belong to one of `n_categories` categories. Item popularity is Zipf: the item of
  popularity rank r (a random permutation, independent of category) has weight w ∝ r^-s.
- Item latents are their category's centroid plus noise; a user picks `interests_per_user`
  categories and their latent has the same affinity for each of those centroids (plus noise).
  So the latent dot product already "knows" a user's interests, as a two-tower model could,
  but not which of them the user follows right now: that is left to the history.

The ground-truth affinity of user u with history h (oldest -> newest) for item i is

    affinity = dot + cross
    dot      = x_u . y_i + log(n_items * w_i)                     (decoupled: two-tower-expressible)
    cross    = cross_strength * (f(n_long) + recency_weight * n_short / recent_window)
                              / (1 + recency_weight)                          (category part)
             + repeat_strength * [i among the last repeat_window events]      (repeat part)
    n_long   = how many of the last history_window events share i's category (events the user
               rated negatively do not count); n_short the same over the last recent_window
    f(n)     = log(1 + min(n, cross_cap)) / log(1 + cross_cap)    (concave, capped count in [0, 1])

The category part is what a two-tower model of small dimension cannot express: it depends jointly
on the counts of categories in the recent history and the candidate's category through a capped,
non-linear count (exactly the count Hard Matching Attention computes, see shared/GESR.md), and
the repeat part is an item-level match no low-rank dot product reproduces. `recency_weight` is
the sequential-dynamics knob: it moves the category part's weight from the long window (which
saturates: a user's regular interests all look alike there) to the last recent_window events
(by default the last one), so users move between their interests, and into new ones they
happened to consume, in sessions: the next item shares the last item's category far more often
than an older item's.

The simulation: every user's sequence is generated step by step, all users of a step at once
(users sorted by sequence length, so the active ones are a prefix). The next item is drawn from
p(i | u, h) ∝ exp(affinity(u, h, i)) over the whole catalogue by sampling-importance-resampling:
a candidate pool is proposed from three disjoint parts of the catalogue (the recent history;
the user's interest categories, through per-category popularity quantile urns; popularity draws
shared by the step for everything else), each entry is weighted by exp(affinity) over its exact
proposal density, and one entry is sampled. Finite pools make the result slightly flatter than
the exact softmax (on `small`, the log's likelihood under the exact softmax is ~0.1 nat per
event below its expectation). Category counts live in (users x categories) matrices updated in
O(1) per event as events enter and leave the windows. Ratings (1..5) grow with how much the
user liked the item (its affinity without the popularity term) plus noise, so positive, neutral
and negative actions all occur (MovieLens-like shares); negatively rated events do not feed
later category counts.

`GroundTruth.affinity(batch, candidates, parts=...)` recomputes the same affinity from a
`RequestBatch` (its history, masked with hist_len, and action codes). It equals the generator's
logits whenever the batch history is at least `max(history_window, repeat_window)` long
(Traffic's default max_len 50 is, for every preset).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl
import torch
from cascade.data.dataset import EVENT_SCHEMA, Dataset, FeatureTable
from torch import Tensor

TRUTH_PARTS = ("dot", "cross", "category", "repeat")
RATING_CENTER = 2.1  # rating of an average item before noise; gives a MovieLens-like mean


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    name: str = "custom"  # dataset name is "synthetic-<name>"
    n_users: int = 2_000
    n_items: int = 3_000
    n_events: int = 100_000  # total, exactly
    n_categories: int = 20
    interests_per_user: int = 3
    zipf_exponent: float = 0.7  # item popularity weight ∝ rank^-zipf_exponent
    latent_dim: int = 16
    dot_strength: float = 1.5  # std of the user-item latent dot product over random pairs
    cross_strength: float = 5.0  # weight of the category-count part of the affinity
    repeat_strength: float = 0.5  # weight of re-consuming one of the last repeat_window items
    recency_weight: float = 4.0  # sequential dynamics: weight of the recent vs the long window
    history_window: int = 30  # events the category count looks back over
    recent_window: int = 1  # 1: the last event's category (first-order sessions)
    repeat_window: int = 10
    cross_cap: float = 10.0  # the long-window category count saturates here
    rating_noise: float = 0.8  # std of the noise on the (1..5) rating scale
    user_noise: float = 1.0  # user latent = mean of interest centroids + this much noise
    item_noise: float = 1.5  # item latent = category centroid + this much noise
    popularity_pool: int = 64  # proposal: popularity draws shared by all users of a step
    interest_pool: int = 32  # proposal: draws per user from their interest categories
    history_pool: int = 8  # proposal: draws per user from their last repeat_window events
    urn_size: int = 1024  # quantile slots per category for the interest proposal
    min_events_per_user: int = 3  # so leave-one-out gives every user a train, valid and test event
    activity_sigma: float = 0.8  # lognormal spread of user sequence lengths
    seed: int = 0
    start_ts: int = 1_600_000_000  # seconds
    time_span: int = 2 * 365 * 86_400  # seconds covered by the log

    def __post_init__(self) -> None:
        def need(ok: bool, field_: str, what: str) -> None:
            if not ok:
                raise ValueError(
                    f"SyntheticConfig.{field_} must be {what}, got {getattr(self, field_)!r}"
                )

        for f in ("n_users", "n_items", "n_categories", "interests_per_user", "latent_dim",
                  "history_window", "recent_window", "repeat_window", "popularity_pool",
                  "interest_pool", "history_pool", "urn_size", "time_span"):
            need(isinstance(getattr(self, f), (int, np.integer)) and getattr(self, f) >= 1, f,
                 "an integer >= 1")
        need(2 <= self.n_items <= 2**24, "n_items", "in [2, 2**24]")
        need(self.min_events_per_user >= 1, "min_events_per_user", ">= 1")
        need(self.n_events >= self.min_events_per_user * self.n_users, "n_events",
             f">= min_events_per_user * n_users = {self.min_events_per_user * self.n_users}")
        need(self.n_categories <= self.n_items, "n_categories", f"<= n_items ({self.n_items})")
        need(self.interests_per_user <= self.n_categories, "interests_per_user",
             f"<= n_categories ({self.n_categories})")
        need(self.recent_window <= self.history_window, "recent_window",
             f"<= history_window ({self.history_window})")
        for f in ("zipf_exponent", "dot_strength", "cross_strength", "repeat_strength",
                  "recency_weight", "rating_noise", "user_noise", "item_noise", "activity_sigma"):
            need(math.isfinite(getattr(self, f)) and getattr(self, f) >= 0, f, "finite and >= 0")
        need(self.cross_cap > 0, "cross_cap", "> 0")
        need(self.start_ts >= 0, "start_ts", ">= 0")
        need(bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(), "name",
             "a non-empty name of letters, digits, '-' and '_'")

    @property
    def truth_window(self) -> int:
        """History length the ground truth looks at: batches at least this long are exact."""
        return max(self.history_window, self.repeat_window)


PRESETS: dict[str, dict] = {
    # tests: a few seconds to generate and to train anything on
    "tiny": dict(n_users=200, n_items=500, n_events=10_000, n_categories=10,
                 interests_per_user=2, latent_dim=8),
    # the `cascade run` default: the whole funnel trains and replays in minutes on 2 cores
    "small": dict(n_users=2_000, n_items=3_000, n_events=100_000, n_categories=20),
    "medium": dict(n_users=20_000, n_items=100_000, n_events=1_000_000, n_categories=100),
    # the scale target (1M items, 10M events): smaller proposal pools keep it under a minute
    "large": dict(n_users=100_000, n_items=1_000_000, n_events=10_000_000, n_categories=200,
                  interest_pool=8, history_pool=4),
}


def preset(name: str, /, **overrides) -> SyntheticConfig:
    """The named preset (tiny | small | medium | large) with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; known: {', '.join(PRESETS)}")
    fields_ = set(SyntheticConfig.__dataclass_fields__)
    bad = sorted(set(overrides) - fields_)
    if bad:
        raise ValueError(
            f"unknown SyntheticConfig field(s) {bad}; known: {', '.join(sorted(fields_))}"
        )
    return SyntheticConfig(**{"name": name, **PRESETS[name], **overrides})


def _category_term(n_long: Tensor, n_short: Tensor, cfg: SyntheticConfig) -> Tensor:
    """The category part of the affinity from the two window counts (module docstring)."""
    f = torch.log1p(n_long.clamp(0.0, cfg.cross_cap)) / math.log1p(cfg.cross_cap)
    short = n_short.clamp(0.0, cfg.recent_window) / cfg.recent_window
    return cfg.cross_strength * (f + cfg.recency_weight * short) / (1.0 + cfg.recency_weight)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """The affinity the synthetic log was generated from (see the module docstring)."""

    config: SyntheticConfig
    user_latent: Tensor  # (n_users, d) float32, already scaled by dot_strength
    item_latent: Tensor  # (n_items, d) float32
    item_bias: Tensor  # (n_items,) float32: log(n_items * popularity weight)
    item_category: Tensor  # (n_items,) int64 in 0..n_categories-1 (feature code = this + 1)
    user_interests: Tensor  # (n_users, interests_per_user) int64 category indices
    _device_cache: dict = field(default_factory=dict, repr=False)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = tuple(
                t.to(device) for t in
                (self.user_latent, self.item_latent, self.item_bias, self.item_category)
            )
        return self._device_cache[key]

    def affinity(
        self, batch, candidates: Tensor, *, parts: Sequence[str] = ("dot", "cross")
    ) -> Tensor:
        """(B, K) float32 ground-truth affinity of each request of `batch` (a RequestBatch) for
        the candidate item ids (B, K). parts: any of "dot" (latent dot product + popularity
        bias), "cross" (= "category" + "repeat"), "category", "repeat"; summed."""
        parts = tuple(parts)
        unknown = [p for p in parts if p not in TRUTH_PARTS]
        if unknown or not parts or len(set(parts)) != len(parts):
            raise ValueError(
                f"GroundTruth.affinity parts must be distinct names from {list(TRUTH_PARTS)}, "
                f"got {list(parts)}"
            )
        if "cross" in parts and ("category" in parts or "repeat" in parts):
            raise ValueError("GroundTruth.affinity parts: 'cross' already includes 'category' "
                             "and 'repeat'; give one or the other")
        cfg = self.config
        dev = candidates.device
        user_lat, item_lat, item_bias, item_cat = self._on(dev)
        cand = candidates.long()
        if cand.dim() != 2 or cand.shape[0] != len(batch):
            raise ValueError(f"candidates must be (B={len(batch)}, K), got {tuple(cand.shape)}")
        if cand.numel() and (int(cand.min()) < 0 or int(cand.max()) >= cfg.n_items):
            raise ValueError(f"candidate ids must be in [0, {cfg.n_items}), got "
                             f"[{int(cand.min())}, {int(cand.max())}]")
        out = torch.zeros(cand.shape, dtype=torch.float32, device=dev)
        if "dot" in parts:
            users = batch.user.to(dev).long()
            out += torch.bmm(item_lat[cand], user_lat[users].unsqueeze(-1)).squeeze(-1)
            out += item_bias[cand]
        want_cat = "cross" in parts or "category" in parts
        want_rep = "cross" in parts or "repeat" in parts
        if want_cat or want_rep:
            hist = batch.hist_items.to(dev).long()  # (B, N)
            hist_len = batch.hist_len.to(dev).long()  # (B,)
            n = hist.shape[1]
            ar = torch.arange(n, device=dev)
            valid = ar[None, :] < hist_len[:, None]  # (B, N)
            age = hist_len[:, None] - 1 - ar[None, :]  # 0 = most recent
            hist = torch.where(valid, hist, torch.zeros_like(hist))
        if want_cat and cfg.cross_strength != 0.0:
            counted = valid & (batch.hist_actions.to(dev) != 1)  # code 1 = negative action
            hist_cat = item_cat[hist]  # (B, N)
            cand_cat = item_cat[cand]  # (B, K)
            n = []
            for window in (cfg.history_window, cfg.recent_window):
                w = (counted & (age < window)).float()
                counts = torch.zeros(len(batch), cfg.n_categories, device=dev)
                n.append(counts.scatter_add_(1, hist_cat, w).gather(1, cand_cat))  # (B, K)
            out += _category_term(n[0], n[1], cfg)
        if want_rep and cfg.repeat_strength != 0.0:
            recent = valid & (age < cfg.repeat_window)
            hit = ((cand[:, :, None] == hist[:, None, :]) & recent[:, None, :]).any(-1)
            out += cfg.repeat_strength * hit.float()
        return out


# ---------------------------------------------------------------------------------------------
# the world: categories, popularity, latents, features


def _quantile_bucket(x: np.ndarray, n: int) -> np.ndarray:
    """Codes 1..n by quantile of x."""
    edges = np.quantile(x, np.linspace(0, 1, n + 1)[1:-1])
    return (1 + np.searchsorted(edges, x, side="right")).astype(np.int64)


def _sample_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_users,) sequence lengths >= min_events_per_user summing to n_events exactly."""
    n, m = cfg.n_users, cfg.min_events_per_user
    extra = cfg.n_events - n * m
    w = rng.lognormal(0.0, cfg.activity_sigma, n) if cfg.activity_sigma > 0 else np.ones(n)
    w = np.minimum(w, 25.0 * w.mean())  # keeps the number of simulation steps bounded
    share = w / w.sum() * extra
    lengths = np.floor(share).astype(np.int64)
    rest = extra - int(lengths.sum())
    if rest:
        lengths[np.argsort(-(share - lengths), kind="stable")[:rest]] += 1
    return lengths + m


@dataclass
class _World:
    item_cat: np.ndarray  # (n_items,) int64 0-based
    pop_w: np.ndarray  # (n_items,) float64, sums to 1
    item_lat: np.ndarray  # (n_items, d) float32 (dot_strength folded into the user side)
    user_lat: np.ndarray  # (n_users, d) float32
    interests: np.ndarray  # (n_users, I) int64
    items: FeatureTable
    users: FeatureTable


def _make_world(cfg: SyntheticConfig, rng: np.random.Generator) -> _World:
    n_i, n_u, n_c, d = cfg.n_items, cfg.n_users, cfg.n_categories, cfg.latent_dim
    # categories of mildly unequal size; every category gets at least one item
    cat_p = np.arange(1, n_c + 1, dtype=np.float64) ** -0.5
    cat_p /= cat_p.sum()
    item_cat = np.concatenate([np.arange(n_c), rng.choice(n_c, n_i - n_c, p=cat_p)])
    item_cat = item_cat[rng.permutation(n_i)].astype(np.int64)
    rank = rng.permutation(n_i).astype(np.float64) + 1.0
    pop_w = rank ** -cfg.zipf_exponent
    pop_w /= pop_w.sum()

    centroids = rng.standard_normal((n_c, d))
    item_lat = centroids[item_cat] + cfg.item_noise * rng.standard_normal((n_i, d))
    # interests: distinct categories per user, more likely the bigger (more popular) ones
    cat_mass = np.bincount(item_cat, weights=pop_w, minlength=n_c)
    gumbel = -np.log(-np.log(rng.random((n_u, n_c))))
    interests = np.argpartition(-(0.5 * np.log(cat_mass)[None, :] + gumbel),
                                cfg.interests_per_user - 1, axis=1)
    interests = interests[:, : cfg.interests_per_user].astype(np.int64)
    # the user's latent has the SAME affinity (d) for each of their interest centroids: the
    # minimum-norm solution of M u = d 1 (M: the interest centroids), plus noise. So no interest
    # dominates by accident, and which one a user follows at a time is left to the dynamics.
    m = centroids[interests]  # (n_u, I, d)
    gram = m @ m.transpose(0, 2, 1) + 1e-6 * np.eye(cfg.interests_per_user)
    coef = np.linalg.solve(gram, np.full((n_u, cfg.interests_per_user, 1), float(d)))
    user_lat = (m.transpose(0, 2, 1) @ coef)[:, :, 0]
    user_lat = user_lat + cfg.user_noise * rng.standard_normal((n_u, d))
    # scale so the dot product has std dot_strength over random (user, item) pairs
    ui = rng.integers(0, n_u, 20_000)
    ii = rng.integers(0, n_i, 20_000)
    raw = np.einsum("nd,nd->n", user_lat[ui], item_lat[ii])
    scale = cfg.dot_strength / max(float(raw.std()), 1e-8)
    user_lat = user_lat * scale

    # features that correlate with the latent preferences (what feature embeddings can use)
    price = _quantile_bucket(item_lat[:, 0] + 0.5 * rng.standard_normal(n_i), 5)
    quality = _quantile_bucket(np.log(pop_w) + rng.standard_normal(n_i), 5)
    cat_codes = item_cat + 1
    items = FeatureTable(
        n=n_i,
        categorical={"category": cat_codes, "price": price, "quality": quality},
        multi={"categories": cat_codes[:, None].copy()},
        cardinality={"category": n_c + 1, "price": 6, "quality": 6, "categories": n_c + 1},
        vocab={
            "category": ["<unknown>", *(f"cat{c:03d}" for c in range(n_c))],
            "categories": ["<pad>", *(f"cat{c:03d}" for c in range(n_c))],
            "price": ["<unknown>", "p1", "p2", "p3", "p4", "p5"],
            "quality": ["<unknown>", "q1", "q2", "q3", "q4", "q5"],
        },
    )
    n_regions = 8
    region = np.where(rng.random(n_u) < 0.7, interests[:, 0] % n_regions,
                      rng.integers(0, n_regions, n_u)) + 1
    age = _quantile_bucket(user_lat[:, 0] / scale + 0.7 * rng.standard_normal(n_u), 7)
    users = FeatureTable(
        n=n_u,
        categorical={"age": age, "region": region.astype(np.int64)},
        cardinality={"age": 8, "region": n_regions + 1},
        vocab={
            "age": ["<unknown>", *(f"age{a}" for a in range(1, 8))],
            "region": ["<unknown>", *(f"region{r}" for r in range(1, n_regions + 1))],
        },
    )
    return _World(item_cat, pop_w, item_lat.astype(np.float32), user_lat.astype(np.float32),
                  interests, items, users)


def _category_urns(cfg: SyntheticConfig, item_cat: np.ndarray, pop_w: np.ndarray):
    """(C, urn_size) item ids at evenly spaced quantiles of each category's popularity
    distribution, and (n_items,) how many slots each item holds (its proposal mass)."""
    n_c, t = cfg.n_categories, cfg.urn_size
    order = np.lexsort((-pop_w, item_cat))  # by category, then popularity
    cat_sorted = item_cat[order]
    w = pop_w[order]
    cat_total = np.bincount(cat_sorted, weights=w, minlength=n_c)
    # cumulative within each category, shifted so category c spans [c, c + 1)
    cum = np.cumsum(w)
    start = np.concatenate([[0.0], np.cumsum(cat_total)[:-1]])
    within = (cum - start[cat_sorted]) / cat_total[cat_sorted]
    within[np.flatnonzero(np.diff(cat_sorted, append=n_c))] = 1.0  # each category's last item
    key = cat_sorted + np.minimum(within, 1.0)
    q = (np.arange(n_c)[:, None] + (np.arange(t)[None, :] + 0.5) / t).ravel()
    idx = np.minimum(np.searchsorted(key, q, side="left"), len(order) - 1)
    urn = order[idx].reshape(n_c, t)
    slots = np.bincount(urn.ravel(), minlength=cfg.n_items)
    return urn.astype(np.int64), slots


# ---------------------------------------------------------------------------------------------
# the simulation


def _simulate(cfg: SyntheticConfig, world: _World, lengths: np.ndarray, rng: np.random.Generator,
              progress: bool):
    """Simulate every user's sequence, all users of a step at once.

    Sampling-importance-resampling with three proposals over DISJOINT parts of the catalogue
    (so each draw is weighted by target / (its proposal's density x its number of draws)):
    - the last repeat_window items of the user: `history_pool` uniform draws;
    - items of the user's interest categories (with urn slots) not in that recent history:
      `interest_pool` draws, each a category with probability ∝ exp(its cross term), then an
      item from that category's popularity quantile urn;
    - every other item: `popularity_pool` popularity draws shared by all users of the step,
      each dropped (weight 0) for the users for whom it falls in another part.
    Category counts are kept as a (users x categories) state and, already transformed into the
    affinity's category term, as FG = [F | G] with F = the category term and G = F but -inf at
    the user's interest categories; all change in O(1) per event.

    Returns the user order (internal index -> user id; users are sorted by sequence length so
    the active ones are always a prefix), the item order (internal index -> item id), the
    number of active users per step and per-step (internal) item, rating and ts tensors."""
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    n_u, n_i, n_c = cfg.n_users, cfg.n_items, cfg.n_categories
    P, Q, H, I = cfg.popularity_pool, cfg.interest_pool, cfg.history_pool, cfg.interests_per_user
    W, R, RR, T = cfg.history_window, cfg.recent_window, cfg.repeat_window, cfg.urn_size
    cs, rs = cfg.cross_strength, cfg.repeat_strength

    order = np.argsort(-lengths, kind="stable")  # internal index k -> user id
    n_active = np.searchsorted(-lengths[order], -np.arange(int(lengths.max())), side="left")

    # items are simulated in an internal order by (category, popularity), so the draws of one
    # step (popular items, items of a few categories) sit close together in memory
    iorder = np.lexsort((-world.pop_w, world.item_cat))  # internal item index -> item id
    pop_w_np = world.pop_w[iorder]
    urn_np, slots_np = _category_urns(cfg, world.item_cat[iorder], pop_w_np)
    urn = torch.from_numpy(urn_np.ravel())  # (C * T,)
    item_cat = torch.from_numpy(world.item_cat[iorder])
    pop_cum = torch.from_numpy(np.cumsum(pop_w_np))
    has_slot = torch.from_numpy(slots_np > 0)
    bias = torch.from_numpy(np.log(pop_w_np * n_i).astype(np.float32))
    with np.errstate(divide="ignore"):  # items without slots are never drawn from the urns
        bias_minus_log_slots = torch.from_numpy(
            (np.log(pop_w_np * n_i) - np.log(slots_np)).astype(np.float32))
    item_lat = torch.from_numpy(world.item_lat[iorder])  # (n_i, d)
    # one row per urn slot: [latent, bias - log(slots), 1 ... item id], so an interest draw is a
    # single row lookup; multiplying by [x_u, 1, 0] gives its log weight's item-dependent part
    d = cfg.latent_dim
    urn_pack = torch.cat([
        item_lat[urn], bias_minus_log_slots[urn][:, None], urn[:, None].float(),
    ], 1)  # (C * T, d + 2); ids are exact in float32 (n_items <= 2**24)
    user_lat = torch.from_numpy(world.user_lat[order])  # internal order
    interests = torch.from_numpy(world.interests[order])  # (n_u, I)
    is_interest = torch.zeros(n_u, n_c, dtype=torch.bool)
    is_interest.scatter_(1, interests, True)
    n_long = torch.zeros(n_u, n_c, dtype=torch.float32)  # category counts, long window
    n_short = torch.zeros(n_u, n_c, dtype=torch.float32)  # and recent window
    fg = torch.zeros(n_u, 2 * n_c, dtype=torch.float32)  # [F | G], see the docstring
    fg[:, n_c:].masked_fill_(is_interest, -math.inf)
    slot_of = torch.full((n_i,), -1, dtype=torch.int64)  # item -> popularity-pool slot
    # log-weight offsets that put all three proposals on the popularity draws' scale
    c_q = math.log(T / Q) + math.log(P) - math.log(n_i)
    # rating: the liking of the chosen item (affinity without popularity) against the liking
    # of an average (popularity-weighted) item, on a scale that grows with the knobs
    y_bar = torch.from_numpy((world.pop_w @ world.item_lat).astype(np.float32))
    like_scale = cfg.dot_strength + 0.5 * cs + 0.5 * rs + 1e-6

    long_flat, short_flat = n_long.view(-1), n_short.view(-1)
    fg_flat, is_interest_flat = fg.view(-1), is_interest.view(-1)

    def rows(table: Tensor, idx: Tensor) -> Tensor:  # table[idx] for any idx shape, fast
        return table.index_select(0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])

    def set_count(ar: Tensor, c: Tensor, d_long: Tensor | None, d_short: Tensor | None) -> None:
        flat = ar * n_c + c  # (B,) cells of the count matrices, one per row
        if d_long is not None:
            long_flat.index_add_(0, flat, d_long)
        if d_short is not None:
            short_flat.index_add_(0, flat, d_short)
        v = _category_term(long_flat.index_select(0, flat), short_flat.index_select(0, flat), cfg)
        fg_flat.index_copy_(0, ar * (2 * n_c) + c, v)
        masked = torch.where(is_interest_flat.index_select(0, flat), -math.inf, v)
        fg_flat.index_copy_(0, ar * (2 * n_c) + n_c + c, masked)

    # timestamps: each user is active over a random part of the span, with bursty gaps
    frac = rng.uniform(0.2, 1.0, n_u)
    start = cfg.start_ts + (rng.random(n_u) * (1.0 - frac) * cfg.time_span)
    mean_gap = frac * cfg.time_span / lengths
    ts_cur = torch.from_numpy(start[order].astype(np.int64))
    mean_gap_t = torch.from_numpy(mean_gap[order]).float()

    s_item: list[Tensor] = []
    s_counted: list[Tensor] = []
    s_rating: list[Tensor] = []
    s_ts: list[Tensor] = []
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("generating synthetic log", total=cfg.n_events)
    for t, B in enumerate(n_active.tolist()):
        xu = user_lat[:B]  # (B, d)
        ar = torch.arange(B)
        m = min(t, RR)
        recent = torch.stack([x[:B] for x in s_item[t - m:]], 1) if m else None  # (B, m)

        # --- popularity draws, shared by the step: (B, P)
        pp = torch.searchsorted(pop_cum, torch.rand(P, generator=gen, dtype=torch.float64))
        pp = pp.clamp_max(n_i - 1)
        col = item_cat[pp] + n_c * has_slot[pp].long()  # G (interest-masked) when the urn has it
        lw_p = torch.addmm(fg[:B].gather(1, col.expand(B, P)), xu, rows(item_lat, pp).T)
        if m:  # drop draws that are in the user's recent history
            pu, inv = torch.unique(pp, return_inverse=True)
            slot_of[pu] = torch.arange(len(pu))
            pen = torch.zeros(B, len(pu) + 1).scatter_(1, rows(slot_of, recent) + 1, -math.inf)
            lw_p += pen.gather(1, (inv + 1).expand(B, P))
            slot_of[pu] = -1

        # --- interest draws: a category ∝ exp(its cross term), then an item through its urn.
        # The weight's cross term and the category's proposal probability cancel but for the
        # user's log-sum-exp over interests, so the draws follow the target closely.
        # (I, B) layout: every op runs along the users, not along a tiny interest axis
        f_int = fg[:B].gather(1, interests[:B]).T.contiguous()  # (I, B)
        mx = f_int.amax(0)
        e_int = (f_int - mx).exp_()
        cum_int = e_int.cumsum_(0)  # (I, B)
        tot = cum_int[-1]
        lse_int = mx + tot.log()
        r = torch.rand(B, Q, generator=gen)
        ci = torch.zeros(B, Q, dtype=torch.int64)
        for k in range(I - 1):  # (B, Q) interest index: how many cumulative shares r exceeds
            ci += r > (cum_int[k] / tot)[:, None]
        cq = interests[:B].gather(1, ci)  # (B, Q)
        g = rows(urn_pack, cq * T + torch.randint(0, T, (B, Q), generator=gen))  # (B, Q, d + 2)
        x_ext = torch.cat([xu, torch.ones(B, 1), torch.zeros(B, 1)], 1)  # (B, d + 2)
        lw_q = torch.bmm(g, x_ext.unsqueeze(-1)).squeeze(-1)
        lw_q += (lse_int + c_q)[:, None]
        iq = g[:, :, d + 1].long()
        parts = [lw_p, lw_q]
        if m:
            in_recent = iq == recent[:, :1]
            for j in range(1, m):  # a loop over the (<= repeat_window) columns beats a 3-d any
                in_recent |= iq == recent[:, j : j + 1]
            lw_q.masked_fill_(in_recent, -math.inf)
            # --- recent-history draws: (B, H)
            ih = recent.gather(1, torch.randint(0, m, (B, H), generator=gen))
            cnt = torch.zeros(B, H)
            for j in range(m):
                cnt += ih == recent[:, j : j + 1]
            lw_h = torch.bmm(rows(item_lat, ih), xu.unsqueeze(-1)).squeeze(-1)
            lw_h += rows(bias, ih) + fg[:B].gather(1, rows(item_cat, ih)) - cnt.log_()
            lw_h += rs + math.log(m / H) + math.log(P) - math.log(n_i)
            parts.append(lw_h)
        lw = torch.cat(parts, 1)  # (B, P + Q [+ H]) log importance weights
        lw -= lw.amax(1, keepdim=True)
        cum = lw.exp_().cumsum_(1)
        u = torch.rand(B, 1, generator=gen) * cum[:, -1:]
        pick = torch.searchsorted(cum, u).squeeze(1).clamp_max(lw.shape[1] - 1)  # (B,)
        item = rows(pp, pick.clamp_max(P - 1))
        from_q = (pick >= P) & (pick < P + Q)
        item = torch.where(from_q, iq.gather(1, (pick - P).clamp(0, Q - 1)[:, None])[:, 0], item)
        repeat = pick >= P + Q
        if m:
            item = torch.where(repeat, ih.gather(1, (pick - P - Q).clamp(0, H - 1)[:, None])[:, 0],
                               item)

        cat_new = rows(item_cat, item)
        like = torch.bmm(rows(item_lat, item).unsqueeze(1), xu.unsqueeze(-1))[:, 0, 0] + fg[:B].gather(1, cat_new[:, None])[:, 0]
        like += rs * repeat.float()
        z = (like - xu @ y_bar) / like_scale
        noise = torch.randn(B, generator=gen) * cfg.rating_noise
        rating = torch.clamp(torch.round(RATING_CENTER + z + noise), 1, 5).to(torch.int8)
        counted = (rating >= 3).float()  # negatively rated events do not feed category counts

        # windows: the new event enters, the events recent_window / history_window back leave
        set_count(ar, cat_new, counted, counted)
        if t >= R:
            set_count(ar, rows(item_cat, s_item[t - R][:B]), None, -s_counted[t - R][:B])
        if t >= W:
            set_count(ar, rows(item_cat, s_item[t - W][:B]), -s_counted[t - W][:B], None)
        gap = mean_gap_t[:B] * torch.exp(torch.randn(B, generator=gen) - 0.5)
        ts_cur[:B] += torch.clamp(gap.round(), min=1).long()

        s_item.append(item)
        s_counted.append(counted)
        s_rating.append(rating)
        s_ts.append(ts_cur[:B].clone())
        if bar is not None:
            bar.advance(task, B)
    if bar is not None:
        bar.stop()
    return order, iorder, n_active, s_item, s_rating, s_ts


def generate(config: SyntheticConfig | None = None, *, progress: bool = False) -> Dataset:
    """A synthetic Dataset (deterministic given config.seed) with `truth` set to its
    GroundTruth. The item category is the categorical feature "category" and the multi-valued
    feature "categories" (the dataset's category_feature)."""
    cfg = config or SyntheticConfig()
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    world = _make_world(cfg, rng)
    lengths = _sample_lengths(cfg, rng)
    # the simulation runs single-threaded: its ops are small, memory-bound gathers, where extra
    # threads mostly add synchronisation, and on a busy 2-core machine (measured: `large` with
    # 20k users / 2M events, another process on one core) 2 threads took 2.1x as long as 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sim_threads = torch.get_num_threads()
    try:
        order, iorder, n_active, s_item, s_rating, s_ts = _simulate(cfg, world, lengths, rng,
                                                                    progress)
    finally:
        torch.set_num_threads(threads)

    # step-major -> (user, pos)-sorted, with one scatter (no sort): event (k, t) of user
    # order[k] lands at offsets[order[k]] + t
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = cfg.n_events
    item = np.empty(n, np.int64)
    ts = np.empty(n, np.int64)
    rating = np.empty(n, np.float32)
    pos = np.empty(n, np.int64)
    base = offsets[order]  # (n_users,) first row of each internal user
    na = np.asarray(n_active, dtype=np.int64)
    t_of = np.repeat(np.arange(len(na), dtype=np.int64), na)  # step of each step-major event
    k_of = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(na) - na, na)  # its internal user
    dest = base[k_of] + t_of
    del k_of
    item[dest] = iorder[torch.cat(s_item).numpy()]
    del s_item
    ts[dest] = torch.cat(s_ts).numpy()
    del s_ts
    rating[dest] = torch.cat(s_rating).numpy()
    del s_rating
    pos[dest] = t_of
    del dest, t_of
    user = np.repeat(np.arange(cfg.n_users, dtype=np.int64), lengths)
    action = np.where(rating >= 4, 1, np.where(rating <= 2, -1, 0)).astype(np.int8)
    events = pl.DataFrame(
        {"user": user, "item": item, "ts": ts, "rating": rating, "action": action, "pos": pos},
        schema=EVENT_SCHEMA,
    )

    truth = GroundTruth(
        config=cfg,
        user_latent=torch.from_numpy(world.user_lat),
        item_latent=torch.from_numpy(world.item_lat),
        item_bias=torch.from_numpy((np.log(world.pop_w) + math.log(cfg.n_items)).astype(np.float32)),
        item_category=torch.from_numpy(world.item_cat),
        user_interests=torch.from_numpy(world.interests),
    )
    seen = int(np.count_nonzero(np.bincount(item, minlength=cfg.n_items)))
    pos_share = float((action == 1).mean())
    neg_share = float((action == -1).mean())
    report = (
        (f"synthetic: {cfg.n_users} users, {cfg.n_items} items ({seen} consumed), {n} events, "
         f"{cfg.n_categories} categories, zipf {cfg.zipf_exponent}"),
        (f"synthetic: cross_strength {cfg.cross_strength}, repeat_strength "
         f"{cfg.repeat_strength}, recency_weight {cfg.recency_weight}; actions "
         f"{pos_share:.0%} positive, {neg_share:.0%} negative"),
        (f"synthetic: generated in {time.perf_counter() - t0:.1f} s on {sim_threads} "
         f"thread(s) (seed {cfg.seed})"),
    )
    src = ", ".join(f"{k}={v}" for k, v in asdict(cfg).items())
    return Dataset(
        name=f"synthetic-{cfg.name}",
        events=events,
        n_users=cfg.n_users,
        n_items=cfg.n_items,
        items=world.items,
        users=world.users,
        raw_user_ids=np.arange(cfg.n_users, dtype=np.int64),
        raw_item_ids=np.arange(cfg.n_items, dtype=np.int64),
        report=report,
        category_feature="categories",
        source=f"synthetic({src})",
        truth=truth,
    )


__all__ = ["PRESETS", "TRUTH_PARTS", "GroundTruth", "SyntheticConfig", "generate", "preset"]
