"""`generate(config)`: a synthetic `Dataset` from a `SyntheticConfig` (the world, the
simulation, then the events in (user, pos) order, with the `GroundTruth` attached)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import numpy as np
import polars as pl
import torch

from cascade.data.dataset import EVENT_SCHEMA, Dataset
from cascade.data.synthetic.config import SyntheticConfig
from cascade.data.synthetic.simulate import simulate
from cascade.data.synthetic.truth import GroundTruth
from cascade.data.synthetic.world import make_world, sample_lengths


def generate(config: SyntheticConfig | None = None, *, progress: bool = False) -> Dataset:
    """A synthetic Dataset (deterministic given config.seed) with `truth` set to its
    GroundTruth. The item category is the categorical feature "category" and the multi-valued
    feature "categories" (the dataset's category_feature)."""
    cfg = config or SyntheticConfig()
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    world = make_world(cfg, rng)
    lengths = sample_lengths(cfg, rng)
    # the simulation runs single-threaded: its ops are small, memory-bound gathers, where extra
    # threads mostly add synchronisation, and on a busy 2-core machine (measured: `large` with
    # 20k users / 2M events, another process on one core) 2 threads took 2.1x as long as 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sim_threads = torch.get_num_threads()
    try:
        order, iorder, n_active, s_item, s_rating, s_ts = simulate(cfg, world, lengths, rng,
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
        item_bias=torch.from_numpy(
            (np.log(world.pop_w) + math.log(cfg.n_items)).astype(np.float32)
        ),
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

