"""The knobs of the synthetic world and its simulation (`SyntheticConfig`, see the package
docstring for what each one does to the affinity) and the named presets, tiny to large."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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

