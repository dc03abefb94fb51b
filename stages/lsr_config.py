"""`LSRConfig`: the late-stage ranker's sizes, objective, training schedule and serving options
(`stages/lsr.py` says what each part is)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cascade.stages.quantize import check_mode
from cascade.stages.training import TrainConfig, check_dropout_search, check_rate


@dataclass(frozen=True, kw_only=True)
class LSRConfig:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    attention: str = "silu"  # "silu" (HSTU pointwise) or "softmax"
    impl: str = "auto"  # target-aware attention implementation: auto | torch | triton | ref
    n_cross: int = 2  # DCN-v2 cross layers
    hidden: int = 128  # width of the crossed features and of the deep MLP
    # 0.3 as SASRec: without it the next-item head overfits a sparse log within two passes
    # (Amazon Toys validation NDCG@10 of the pretraining phase 0.039 at 0 -> 0.040 at 0.3; with
    # user_id off as well 0.051)
    dropout: float = 0.3
    # other rates tried beside `dropout`, chosen by validation on the user's own log: the
    # pretraining phase runs once per rate, each from the same initial weights, and the rate
    # whose generative head validates best (full-catalogue NDCG@10 on the validation requests;
    # a tie keeps the earlier) is kept, with its weights, for the joint phase and serving; each
    # rate costs one more pretraining (Toys ~60 s). Off by default: pretraining validation
    # NDCG@10 at 0.1 / 0.2 / 0.3 / 0.5 read ml-100k 0.082 / - / 0.102 / 0.088 (0.3 stands out)
    # and Amazon Toys - / 0.0572 / 0.0565 / 0.0549 in one run, 0.3 / 0.5 0.0551 / 0.0563 in the
    # next (2-thread training is not bitwise repeatable): on Toys the choice followed the noise,
    # and the run that picked 0.5 lost 0.0065 HR@10 on the test requests (LSR alone)
    dropout_search: tuple[float, ...] = ()
    # history tokens (item and action embeddings, which start at std 0.05) and candidates' item
    # embeddings times `token_scale`; history tokens then through `token_dropout` (SASRec's
    # embedding dropout). At scale 1 the tokens are small beside the layers' outputs in the
    # residual stream; at scale 20 they have unit std, as SASRec's scaled embeddings do
    token_scale: float = 1.0
    token_dropout: float = 0.0
    # (token_scale, token_dropout) pairs tried beside the pair above, chosen by validation in
    # the pretraining phase as `dropout_search` is (one more pretraining per pair and dropout
    # rate; a pair equal to the configured one is dropped from the search). The best pair
    # follows the log's density. Amazon Toys (5.6 training events per user), all test requests,
    # the LSR alone: 1 / 0 HR@10 / NDCG@10 0.0710 / 0.0444, 20 / 0 0.0788 / 0.0503, 20 / 0.3
    # 0.0847 / 0.0533, 20 / 0.5 0.0900 / 0.0565 (validation NDCG@10 0.064 -> 0.072), 20 / 0.7
    # 0.0791 / 0.0459; 20 / 0.5 with `dropout` 0.5 0.0896 / 0.0583, but its validation (0.069)
    # was no better than 0.3's (0.068 and 0.072 in two runs), so it is not the default. ml-100k
    # (106 per user): 1 / 0 0.177 / 0.0887, 20 / 0 0.157 / 0.080, 20 / 0.3 0.163 / 0.085,
    # 5 / 0.3 0.161 / 0.082 (validation 0.102 at 1 / 0, 0.085-0.088 at the others). Without a
    # pretraining phase (`pretrain` None, or `next_item_weight` 0) nothing is searched: the
    # pair above is used
    token_search: tuple[tuple[float, float], ...] = ((20.0, 0.5),)
    max_len: int | None = None  # use at most this many recent history events (None: all given)
    n_negatives: int = 16
    pop_negatives: float = 0.5  # share of negatives drawn by popularity ** 0.75 (hard ones)
    # strength of the logQ correction in the ranking loss: 1 = unbiased sampled softmax (full-
    # catalogue ranking), 0 = plain hard-negative softmax (discrimination among popular items)
    rank_logq: float = 1.0
    # a user-id embedding (long-term preference). Off: on a sparse log (5.6 training events per
    # user on Toys) it memorises the training targets (Toys pretraining validation NDCG@10 0.040 on vs
    # 0.051 off); on ml-100k (106 per user) it made no clear difference (0.100 vs 0.102)
    user_id: bool = False
    match_recent: int = 5  # the "recent" window of the explicit match counts
    prefixes_per_window: int = 4  # ranking examples per encoded window (joint phase)
    next_item_weight: float = 1.0  # weight of the generative next-item loss (0 = off)
    # next-item loss: negatives drawn from the batch's positives (at most one per position in the
    # batch), and uniform ones. Amazon Toys, pretraining validation NDCG@10: 512 + 512 0.0506,
    # 2048 + 2048 0.0583 (1.9x the time of an epoch), 2048 + 4096 0.0568, the full softmax
    # 0.0576 (4.2x); a dot product in place of the cosine 0.0557 (full softmax) and 0.0435 (512
    # popularity-sampled negatives, SASRec's); temperature 0.1 0.0549; positions counted from
    # the newest event 0.0457; dropout on the input tokens 0.0492; softmax attention 0.0524
    in_batch_negatives: int = 2048
    n_uniform_negatives: int = 2048
    # the next-item loss is the full softmax over the catalogue up to this many items (or when
    # the sample above would be as large), else the sampled one. Amazon Toys (11,924 items), all
    # 19,412 test requests, the LSR alone: HR@10 / NDCG@10 0.0666 / 0.0396 sampled -> 0.0729 /
    # 0.0453 full, fit 68 s -> 139 s on 2 cores
    full_softmax_items: int = 16384
    temperature: float = 0.05  # next-item loss: cosine temperature
    # early stopping: "rerank_ndcg" (NDCG@10 re-ranking the generative head's top
    # `valid_candidates`, aligned with the full-catalogue reference) or "sampled_mrr"
    validation: str = "rerank_ndcg"
    valid_candidates: int = 100
    valid_requests: int = 2000
    score_chunk: int = 512  # candidates scored per request at a time in score / score_all
    quantize: str = "none"  # serving: "int8" = dynamic int8 linear layers (stages/quantize.py)
    # validation NDCG is noisy on ml-100k-sized logs: patience 2 stopped some seeds at epoch 5
    # with NDCG@10 0.065, where 12 epochs reach 0.094 (experiments/bench_stages.py). After the
    # pretraining phase the joint phase needs its patience too: 8 epochs, patience 3 and 2
    # prefixes per window never beat the pretrained weights on ml-100k (full-catalogue test
    # NDCG@10 0.066), where this schedule passed them at epoch 9 (0.095). Since the pretraining
    # phase came first, no joint epoch has beaten it on ml-100k or Toys: patience 2 (was 4), to
    # keep the ml-100k run under 3 minutes
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=12, batch_size=64, lr=4e-3, patience=2, max_steps_per_epoch=40
        )
    )
    # phase 1, before `train`: the encoder, item embeddings and generative head trained on the
    # next-item loss alone (no per-pair ranking work, so several times cheaper a window), full
    # passes over the windows with early stopping on the head's full-catalogue NDCG@10. None
    # (or next_item_weight 0) skips it. Sparse logs need it: the joint phase's 480 steps of 64
    # windows see ~1.6 passes over the Amazon Toys file, where SASRec needs ~15
    pretrain: TrainConfig | None = field(
        default_factory=lambda: TrainConfig(
            epochs=40, batch_size=128, lr=3e-3, patience=2, length_batches=True
        )
    )

    def __post_init__(self) -> None:
        for name in (
            "dim", "n_layers", "n_heads", "n_cross", "hidden", "n_negatives",
            "prefixes_per_window", "valid_requests", "score_chunk", "match_recent",
            "valid_candidates", "full_softmax_items",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"LSRConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"LSRConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.validation not in ("rerank_ndcg", "sampled_mrr"):
            raise ValueError("LSRConfig.validation must be 'rerank_ndcg' or 'sampled_mrr', "
                             f"got {self.validation!r}")
        if self.attention not in ("silu", "softmax"):
            raise ValueError(f"LSRConfig.attention must be 'silu' or 'softmax', got {self.attention!r}")
        if self.impl not in ("auto", "torch", "triton", "ref"):
            raise ValueError(
                f"LSRConfig.impl must be one of 'auto', 'torch', 'triton', 'ref', got {self.impl!r}"
            )
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"LSRConfig.max_len must be >= 1 or None, got {self.max_len}")
        if not 0.0 <= self.pop_negatives <= 1.0:
            raise ValueError(f"LSRConfig.pop_negatives must be in [0, 1], got {self.pop_negatives}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LSRConfig.dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "dropout_search", check_dropout_search(
            self.dropout, self.dropout_search, "LSRConfig"))
        pairs = self.token_search
        if not isinstance(pairs, (tuple, list)) or not all(
                isinstance(t, (tuple, list)) and len(t) == 2 for t in pairs):
            raise ValueError("LSRConfig.token_search must be a list of [token_scale, token_dropout] "
                             f"pairs, got {pairs!r}")
        own = (_scale(self.token_scale, "LSRConfig.token_scale"),
               check_rate(self.token_dropout, "LSRConfig.token_dropout"))
        pairs = tuple((_scale(a, f"LSRConfig.token_search[{i}] scale"),
                       check_rate(b, f"LSRConfig.token_search[{i}] dropout"))
                      for i, (a, b) in enumerate(pairs))
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"LSRConfig.token_search repeats a pair: {[list(t) for t in pairs]}")
        # the configured pair is tried first anyway: a default search that holds it adds nothing
        object.__setattr__(self, "token_search", tuple(t for t in pairs if t != own))
        if self.next_item_weight < 0 or self.in_batch_negatives < 0 or self.n_uniform_negatives < 0:
            raise ValueError("LSRConfig.next_item_weight, in_batch_negatives and "
                             "n_uniform_negatives must be >= 0")
        if not 0.0 <= self.rank_logq <= 1.0:
            raise ValueError(f"LSRConfig.rank_logq must be in [0, 1], got {self.rank_logq}")
        check_mode(self.quantize, "LSRConfig.quantize")
        if not self.temperature > 0:
            raise ValueError(f"LSRConfig.temperature must be > 0, got {self.temperature}")
        if not isinstance(self.train, TrainConfig):
            raise ValueError("LSRConfig.train must be a TrainConfig")
        if self.pretrain is not None and not isinstance(self.pretrain, TrainConfig):
            raise ValueError("LSRConfig.pretrain must be a TrainConfig or left out")
        if self.dropout_search and (self.pretrain is None or self.next_item_weight == 0):
            raise ValueError("LSRConfig.dropout_search chooses the rate in the pretraining phase: it "
                             "needs pretrain set and next_item_weight > 0")

    def dropout_rates(self) -> tuple[float, ...]:
        """The rates the pretraining phase tries: `dropout` first, then `dropout_search`."""
        return (self.dropout, *self.dropout_search)

    def pretrain_settings(self) -> list[dict]:
        """What the pretraining phase tries, in order: every dropout rate with every token pair,
        the configured ones first."""
        tokens = ((self.token_scale, self.token_dropout), *self.token_search)
        return [{"dropout": p, "token_scale": float(s), "token_dropout": float(q)}
                for p in self.dropout_rates() for s, q in tokens]


def _scale(value: object, name: str) -> float:
    """A token scale: a number > 0; else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)
