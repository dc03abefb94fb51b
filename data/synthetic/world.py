"""The synthetic world, drawn once per seed: item categories, Zipf popularity, user and item
latents (users share an affinity with their interest categories' centroids), the item and user
features that correlate with them, each user's sequence length, and the per-category
popularity urns the simulation proposes interest items from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cascade.data.dataset import FeatureTable
from cascade.data.synthetic.config import SyntheticConfig


def _quantile_bucket(x: np.ndarray, n: int) -> np.ndarray:
    """Codes 1..n by quantile of x."""
    edges = np.quantile(x, np.linspace(0, 1, n + 1)[1:-1])
    return (1 + np.searchsorted(edges, x, side="right")).astype(np.int64)


def sample_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
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
class World:
    item_cat: np.ndarray  # (n_items,) int64 0-based
    pop_w: np.ndarray  # (n_items,) float64, sums to 1
    item_lat: np.ndarray  # (n_items, d) float32 (dot_strength folded into the user side)
    user_lat: np.ndarray  # (n_users, d) float32
    interests: np.ndarray  # (n_users, I) int64
    items: FeatureTable
    users: FeatureTable


def make_world(cfg: SyntheticConfig, rng: np.random.Generator) -> World:
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
    return World(item_cat, pop_w, item_lat.astype(np.float32), user_lat.astype(np.float32),
                  interests, items, users)


def category_urns(cfg: SyntheticConfig, item_cat: np.ndarray, pop_w: np.ndarray):
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

