"""A tiny interaction log with a known signal, for the stage tests (no other module needed).

Each user follows one favourite category (tied to the user's features) and walks along a fixed
chain of that category's items (next item = successor of the last one from that category),
mixed with Zipf-popular items. So history, features and popularity all carry signal, and a
sequence-aware model can beat most-popular by a wide margin.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from cascade.data.dataset import Dataset, FeatureTable, finalize_events


def tiny_dataset(
    *, n_users: int = 300, n_items: int = 120, n_categories: int = 6, length=(15, 35), seed: int = 0
) -> Dataset:
    rng = np.random.default_rng(seed)
    cat = np.arange(n_items) % n_categories  # item category 0..C-1
    second = (cat + 1 + rng.integers(0, n_categories - 1, n_items)) % n_categories
    has_second = rng.random(n_items) < 0.3
    genres = np.stack([cat + 1, np.where(has_second, second + 1, 0)], 1).astype(np.int64)
    decade = (rng.integers(0, 4, n_items) + 1).astype(np.int64)
    chains = [np.flatnonzero(cat == c) for c in range(n_categories)]
    pop = 1.0 / np.arange(1, n_items + 1) ** 1.1
    pop = pop[rng.permutation(n_items)]
    pop /= pop.sum()

    fav = rng.integers(0, n_categories, n_users)
    gender = (fav % 2 + 1).astype(np.int64)  # features tell part of the favourite category
    age = (fav // 2 + 1).astype(np.int64)
    users, items, ts, ratings = [], [], [], []
    for u in range(n_users):  # test-data generator: per-user Python is fine here
        n = int(rng.integers(length[0], length[1] + 1))
        chain = chains[fav[u]]
        p = int(rng.integers(0, len(chain)))
        t = int(rng.integers(0, 10**6))
        for _ in range(n):
            if rng.random() < 0.75:
                p = (p + 1) % len(chain)
                it, r = int(chain[p]), float(rng.choice([3, 4, 5], p=[0.1, 0.4, 0.5]))
            else:
                it, r = int(rng.choice(n_items, p=pop)), float(rng.integers(1, 6))
            t += int(rng.integers(60, 10**5))
            users.append(u), items.append(it), ts.append(t), ratings.append(r)
    events = finalize_events(
        pl.DataFrame({"user": users, "item": items, "ts": ts, "rating": ratings}).with_columns(
            pl.col("rating").cast(pl.Float32)
        )
    )
    return Dataset(
        name=f"tiny-{seed}",
        events=events,
        n_users=n_users,
        n_items=n_items,
        items=FeatureTable(
            n=n_items,
            categorical={"decade": decade},
            multi={"genres": genres},
            cardinality={"decade": 5, "genres": n_categories + 1},
        ),
        users=FeatureTable(
            n=n_users,
            categorical={"gender": gender, "age": age},
            cardinality={"gender": 3, "age": 5},
        ),
        raw_user_ids=np.arange(n_users),
        raw_item_ids=np.arange(n_items),
        category_feature="genres",
        source="tests/stage_data.py",
    )


def fit_context(dataset: Dataset, *, max_len: int = 20, cache_dir=None, seed: int = 0):
    import torch

    from cascade.data.splits import make_split, training_requests
    from cascade.data.traffic import Traffic
    from cascade.stages.base import FitContext

    split = make_split(dataset)
    return FitContext(
        dataset=dataset,
        split=split,
        train=Traffic(dataset, training_requests(split), max_len=max_len),
        valid=Traffic(dataset, split.valid, max_len=max_len),
        device=torch.device("cpu"),
        seed=seed,
        cache_dir=cache_dir,
        progress=False,
    )
