"""Traffic: requests with their histories, batched as padded tensors for the stages.

`Traffic` keeps one int array per request column and builds each batch's histories on demand
with one vectorised gather over the dataset's (user, pos)-sorted events, so a stream of millions
of requests never materialises (requests x history) arrays and no Python runs per event.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields, replace
from typing import Iterator

import numpy as np
import polars as pl
import torch
from torch import Tensor

from cascade.data.dataset import Dataset, DataError
from cascade.data.derive import action_codes, gap_buckets


@dataclass(frozen=True)
class RequestBatch:
    """B requests. History is oldest -> newest, left-aligned, right-padded with 0; the first
    `hist_len[b]` positions of row b are real events (the most recent `max_len` of them)."""

    request_id: Tensor  # (B,) int64
    user: Tensor  # (B,) int64
    ts: Tensor  # (B,) int64
    hist_items: Tensor  # (B, N) int64, 0 at padding (item 0 is real: always mask with hist_len)
    hist_actions: Tensor  # (B, N) int64: 0 pad, 1 negative, 2 neutral, 3 positive
    hist_gaps: Tensor  # (B, N) int64: 0 pad, 1..31 log2 bucket of (request ts - event ts)
    hist_len: Tensor  # (B,) int64 in [0, N]
    user_feats: Tensor  # (B, F_u) int64 user categorical codes (dataset.users order)
    targets: Tensor  # (B, T) int64 ground-truth items, padded with -1

    def __len__(self) -> int:
        return int(self.user.shape[0])

    @property
    def hist_mask(self) -> Tensor:  # (B, N) bool, True at real events
        n = self.hist_items.shape[1]
        return torch.arange(n, device=self.hist_len.device)[None, :] < self.hist_len[:, None]

    def to(self, device: torch.device | str) -> "RequestBatch":
        return RequestBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, idx: Tensor) -> "RequestBatch":
        """Rows `idx` of the batch (used to split work or drop requests)."""
        return RequestBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def trimmed(self) -> "RequestBatch":
        """The batch with its history columns cut to its longest history (at least one column):
        the same requests, without the padding no row uses."""
        n = max(int(self.hist_len.max()) if len(self) else 0, 1)
        if n >= self.hist_items.shape[1]:
            return self
        return replace(self, hist_items=self.hist_items[:, :n], hist_actions=self.hist_actions[:, :n],
                       hist_gaps=self.hist_gaps[:, :n])

    def length_groups(self, size: int) -> Iterator[tuple[Tensor, "RequestBatch"]]:
        """(rows, those requests trimmed) in groups of `size` requests of similar history length,
        shortest first: serving a group then spans its own longest history, not the batch's."""
        if len(self) <= size:
            yield torch.arange(len(self), device=self.hist_len.device), self.trimmed()
            return
        order = torch.argsort(self.hist_len, stable=True)
        for lo in range(0, len(self), size):
            rows = order[lo : lo + size]
            yield rows, self.select(rows).trimmed()


_EVENT_ARRAYS: dict[int, tuple[weakref.ref, tuple]] = {}


def _event_arrays(dataset: Dataset) -> tuple:
    """The event columns every Traffic over `dataset` reads (items, times, action codes, user
    offsets, user features), built once per dataset and shared, read-only: a run holds several
    Traffic objects (train, windows, validation, test, subsamples), and on a 10M-event log each
    copy cost 240 MB."""
    key = id(dataset)
    hit = _EVENT_ARRAYS.get(key)
    if hit is not None and hit[0]() is dataset:
        return hit[1]
    ev = dataset.events
    arrays = (ev["item"].to_numpy().astype(np.int64), ev["ts"].to_numpy().astype(np.int64),
              action_codes(ev["action"].to_numpy()), dataset.user_offsets(),
              dataset.users.categorical_matrix())
    for a in arrays:
        a.flags.writeable = False
    # dropped with the dataset (the callback runs when it is freed, before its id can be reused)
    ref = weakref.ref(dataset, lambda _r, k=key: _EVENT_ARRAYS.pop(k, None))
    _EVENT_ARRAYS[key] = (ref, arrays)
    return arrays


class Traffic:
    """A stream of requests over a Dataset (see `cascade.data.splits` for request tables)."""

    def __init__(self, dataset: Dataset, requests: pl.DataFrame, *, max_len: int = 50) -> None:
        if max_len < 1:
            raise ValueError(f"Traffic.max_len must be >= 1, got {max_len}")
        missing = [c for c in ("request_id", "user", "ts", "pos", "item") if c not in requests.columns]
        if missing:
            raise DataError(f"request table lacks columns {missing}")
        self.dataset = dataset
        self.max_len = max_len
        self.request_id = requests["request_id"].to_numpy().astype(np.int64)
        self.user = requests["user"].to_numpy().astype(np.int64)
        self.ts = requests["ts"].to_numpy().astype(np.int64)
        self.pos = requests["pos"].to_numpy().astype(np.int64)
        if "targets" in requests.columns:  # several ground-truth items per request
            lists = requests["targets"].to_list()
            t = max((len(x) for x in lists), default=1)
            self.targets = np.full((len(lists), max(t, 1)), -1, dtype=np.int64)
            for i, x in enumerate(lists):  # only request-level Python, once per table
                self.targets[i, : len(x)] = x
        else:
            self.targets = requests["item"].to_numpy().astype(np.int64)[:, None]
        (self._ev_item, self._ev_ts, self._ev_action, self._offsets,
         self._user_feats) = _event_arrays(dataset)
        if len(self.user) and (self.user.min() < 0 or self.user.max() >= dataset.n_users):
            raise DataError(
                f"request table has user ids outside [0, {dataset.n_users}) "
                f"(got {self.user.min()}..{self.user.max()})"
            )
        if len(self.pos) and self.pos.min() < 0:
            raise DataError(f"request table has a negative pos ({self.pos.min()})")
        n_user_events = self._offsets[self.user + 1] - self._offsets[self.user]
        if len(self.user) and (self.pos > n_user_events).any():
            raise DataError("request table has a pos beyond its user's events")

    def __len__(self) -> int:
        return len(self.user)

    def batch(self, idx: np.ndarray | slice) -> RequestBatch:
        """The requests at `idx`, with histories gathered in one vectorised step."""
        user, pos, ts = self.user[idx], self.pos[idx], self.ts[idx]
        n = self.max_len
        length = np.minimum(pos, n)  # (B,)
        start = self._offsets[user] + pos - length  # first history row, global
        ar = np.arange(n)[None, :]
        mask = ar < length[:, None]  # (B, N)
        rows = np.where(mask, start[:, None] + ar, 0)
        items = np.where(mask, self._ev_item[rows], 0)
        actions = np.where(mask, self._ev_action[rows], 0)
        gaps = np.where(mask, gap_buckets(ts[:, None] - self._ev_ts[rows]), 0)
        return RequestBatch(
            request_id=torch.from_numpy(self.request_id[idx].copy()),
            user=torch.from_numpy(user.copy()),
            ts=torch.from_numpy(ts.copy()),
            hist_items=torch.from_numpy(items),
            hist_actions=torch.from_numpy(actions),
            hist_gaps=torch.from_numpy(gaps),
            hist_len=torch.from_numpy(length.astype(np.int64)),
            user_feats=torch.from_numpy(self._user_feats[user]),
            targets=torch.from_numpy(self.targets[idx].copy()),
        )

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[RequestBatch]:
        order = np.arange(len(self))
        if shuffle:
            np.random.default_rng(seed).shuffle(order)
        for i in range(0, len(order), batch_size):
            yield self.batch(order[i : i + batch_size])

    def length_batches(
        self, batch_size: int, *, seed: int = 0, pool: int = 64
    ) -> Iterator[RequestBatch]:
        """Shuffled batches of requests with similar history lengths, each trimmed to its longest
        history (`RequestBatch.trimmed`): every request once per pass, as `batches(shuffle=True)`,
        with little padding on a log of mostly short histories (the Amazon Toys file: a median
        of 3 events against a width of 50). The requests are shuffled and cut into pools of
        `pool` batches; each pool is sorted by history length and cut into batches, and the
        batches are shuffled. A batch of short histories holds fewer events than one of long
        histories: a loss that averages over events should weight a batch by its event count
        (`history_lengths`)."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self))
        length = self.history_lengths()
        batches = []
        for i in range(0, len(order), batch_size * pool):
            part = order[i : i + batch_size * pool]
            part = part[np.argsort(length[part], kind="stable")]
            batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
        for k in rng.permutation(len(batches)):
            yield self.batch(batches[k]).trimmed()

    def history_lengths(self) -> np.ndarray:
        """(R,) each request's history length (its events before `pos`, at most `max_len`)."""
        return np.minimum(self.pos, self.max_len)

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)
