"""The simulation that draws a synthetic log, one step (one event per active user) at a time.

Every user's sequence is generated step by step, all users of a step at once
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
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from cascade.data.synthetic.config import SyntheticConfig
from cascade.data.synthetic.truth import category_term
from cascade.data.synthetic.world import World, category_urns

RATING_CENTER = 2.1  # rating of an average item before noise; gives a MovieLens-like mean


def simulate(cfg: SyntheticConfig, world: World, lengths: np.ndarray, rng: np.random.Generator,
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
    urn_np, slots_np = category_urns(cfg, world.item_cat[iorder], pop_w_np)
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
        v = category_term(long_flat.index_select(0, flat), short_flat.index_select(0, flat), cfg)
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
        like = (torch.bmm(rows(item_lat, item).unsqueeze(1), xu.unsqueeze(-1))[:, 0, 0]
                + fg[:B].gather(1, cat_new[:, None])[:, 0])
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

