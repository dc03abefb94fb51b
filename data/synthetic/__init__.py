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

Where each piece lives:
- `config.py`: `SyntheticConfig` (every knob above, validated) and the named `PRESETS`.
- `truth.py`: `GroundTruth`, which recomputes the affinity for any batch of requests.
- `world.py`: the world (categories, popularity, latents, features) and sequence lengths.
- `simulate.py`: the step-by-step simulation that draws every user's sequence.
- `generator.py`: `generate(config)`, which runs them and returns the `Dataset`.
"""

from cascade.data.synthetic.config import PRESETS, SyntheticConfig, preset
from cascade.data.synthetic.generator import generate
from cascade.data.synthetic.truth import TRUTH_PARTS, GroundTruth

__all__ = ["PRESETS", "TRUTH_PARTS", "GroundTruth", "SyntheticConfig", "generate", "preset"]
