"""Configuration of GESR (Generative Early Stage Ranking, Hong et al., arXiv 2511.21095).

`MoAConfig` is the paper's "MoA Config" plus the module switches: which Mixture-of-Attention
modules run (Hard Matching Attention, target-aware self attention, NRO / RO cross attention),
whether their embeddings are fused by MLPG, how the history is truncated in time and which
(history feature, candidate feature) pairs HMA counts. `GESRConfig` holds the model sizes, the
training objective and the `TrainConfig` of the shared loop.

Every switch off gives back the plain two-tower ESR (the primary logit alone), so the ablation
table (two-tower, +HMA, +self attention, +cross attention, +MLPG = full GESR) is a set of
configs (`cascade ablation`).

`GESRConfig` accepts plain dicts for its nested members (`GESRConfig(moa={...}, train={...})`,
each overriding GESR's own defaults), so TOML tables map onto it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cascade.stages.quantize import check_mode
from cascade.stages.training import TrainConfig
from cascade.util.tables import from_table

# HMA pairs (history feature vs candidate feature); "_pos" restricts the history to events
# with a positive action (rating >= 4 on MovieLens), "_recent" to the `hma_recent` newest events.
HMA_PAIRS: tuple[str, ...] = (
    "item", "category", "item_pos", "category_pos", "item_recent", "category_recent"
)
CROSS_KINDS: tuple[str, ...] = ("nro", "ro")
ATTN_KINDS: tuple[str, ...] = ("silu", "softmax")
IMPLS: tuple[str, ...] = ("auto", "triton", "torch", "ref")
NRO_QUERIES: tuple[str, ...] = ("item", "features")


@dataclass(frozen=True, kw_only=True)
class MoAConfig:
    """Which MoA modules run, and the MoA Config preprocessing (GESR.md)."""

    hma: bool = True  # Hard Matching Attention
    self_attn: bool = True  # target-aware self attention over [history ; candidates]
    # any of "nro", "ro" (a list, or one name); true or "both" = both, false, () or "none" = off
    cross_attn: tuple[str, ...] | bool | str = CROSS_KINDS
    mlpg: bool = True  # Multi-Logit Parameterized Gating; off = ungated concat -> one MLP
    history_len: int = 50  # time truncation: the most recent N events are used
    hma_pairs: tuple[str, ...] = HMA_PAIRS
    hma_cap: int = 16  # M: match counts are capped at M (buckets 0..M)
    hma_recent: int = 10  # window of the "_recent" pairs
    token_features: bool = True  # history tokens also carry the item's feature embedding

    def __post_init__(self) -> None:
        cross = self.cross_attn
        if cross is True:
            cross = CROSS_KINDS
        elif cross is False or cross is None:
            cross = ()
        elif isinstance(cross, str):
            cross = CROSS_KINDS if cross == "both" else (() if cross == "none" else (cross,))
        cross = tuple(cross)
        bad = [c for c in cross if c not in CROSS_KINDS]
        if bad or len(set(cross)) != len(cross):
            raise ValueError(
                f"MoAConfig.cross_attn must be a subset of {list(CROSS_KINDS)} (or true/false), "
                f"got {self.cross_attn!r}"
            )
        object.__setattr__(self, "cross_attn", tuple(c for c in CROSS_KINDS if c in cross))
        pairs = tuple(self.hma_pairs)
        bad = [p for p in pairs if p not in HMA_PAIRS]
        if bad or len(set(pairs)) != len(pairs):
            raise ValueError(
                f"MoAConfig.hma_pairs must be distinct names from {list(HMA_PAIRS)}, "
                f"got {self.hma_pairs!r}"
            )
        object.__setattr__(self, "hma_pairs", pairs)
        if self.hma and not pairs:
            raise ValueError("MoAConfig.hma_pairs must not be empty while hma is on")
        for name in ("hma", "self_attn", "mlpg", "token_features"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoAConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.history_len < 1:
            raise ValueError(f"MoAConfig.history_len must be >= 1, got {self.history_len}")
        if self.hma_recent < 1:
            raise ValueError(f"MoAConfig.hma_recent must be >= 1, got {self.hma_recent}")
        if self.hma_cap < 1:
            raise ValueError(f"MoAConfig.hma_cap must be >= 1, got {self.hma_cap}")

    @property
    def nro(self) -> bool:
        return "nro" in self.cross_attn

    @property
    def ro(self) -> bool:
        return "ro" in self.cross_attn

    @property
    def modules(self) -> tuple[str, ...]:
        """Names of the enabled MoA embeddings, in the order the model fuses them."""
        return tuple(
            name
            for name, on in (
                ("match", self.hma),
                ("self", self.self_attn),
                ("nro", self.nro),
                ("ro", self.ro),
            )
            if on
        )

    @classmethod
    def two_tower(cls, **overrides: Any) -> "MoAConfig":
        """Every MoA module off: GESR reduces to its two towers (the primary logit)."""
        return cls(**{"hma": False, "self_attn": False, "cross_attn": (), "mlpg": False, **overrides})


def _default_train() -> TrainConfig:
    # phase 2 (all modules): up to 3 epochs, patience 2 (was 2 and 1, with phase 1 at 6 and 1:
    # both still improving when cut). ml-100k, all test requests, GESR alone: HR@10 / NDCG@10
    # 0.140 / 0.075 -> 0.187 / 0.092, validation sampled MRR 0.365 -> 0.395 (best at epoch 3
    # of 4), fit 42 s -> 85 s on one thread
    return TrainConfig(epochs=3, batch_size=256, lr=2e-3, patience=2, max_steps_per_epoch=120,
                       length_batches=True)


def _default_pretrain() -> TrainConfig:
    # phase 1 (the towers alone): cheap steps, so more of them than phase 2; up to 12 epochs,
    # patience 2 (ml-100k: best at epoch 11; see `_default_train`)
    # requests of similar history length per batch (both phases): Amazon Toys fit 144 s -> 117 s
    # on one thread, validation sampled MRR 0.3127 -> 0.3167
    return TrainConfig(epochs=12, batch_size=512, lr=2e-3, patience=2, max_steps_per_epoch=120,
                       length_batches=True)


@dataclass(frozen=True, kw_only=True)
class GESRConfig:
    """Model sizes, objective and training of the GESR early-stage ranker."""

    dim: int = 64  # D: the towers (user, item) and the embeddings they share with the MoA
    hidden: int = 128  # hidden width of the tower MLPs
    moa_dim: int = 16  # d: width of every MoA embedding (T_match, T_self, T_nro, T_ro) and token
    n_layers: int = 1  # target-aware self attention layers
    n_heads: int = 2  # heads of the self attention (over moa_dim)
    attn_kind: str = "silu"  # "silu" (HSTU pointwise) or "softmax"
    impl: str = "auto"  # attention implementation; auto = triton on CUDA, torch on CPU
    cross_heads: int = 2  # heads of the NRO / RO cross attention (over moa_dim)
    nro_queries: str = "item"  # NRO queries per candidate: "item" (one: its pooled feature
    #                            embedding) or "features" (one per feature token: F x the cost)
    hma_dim: int = 8  # width of one HMA count-bucket embedding
    logit_hidden: int = 32  # hidden width of the HMA MLP and of the secondary-logit MLPs
    dropout: float = 0.1  # in the tower MLPs and the self-attention layers
    recent: int = 5  # the user tower also pools this many newest history tokens
    n_negatives: int = 16  # sampled negatives per training request
    interest_negatives: float = 0.5  # share of them interest-matched (a category of a random
    #                                  history event; see sampling.py)
    pop_negatives: float = 0.5  # of the other negatives, share drawn by popularity ** 0.75
    #                             (the rest uniformly)
    logq_correction: bool = True  # train on s - log E(i | u), so s is unbiased by the sampler
    aux_weight: float = 0.5  # weight of the auxiliary BCE on the primary logit alone
    valid_negatives: int = 100  # negatives per validation request
    valid_requests: int = 2000  # validation requests used (evenly spaced subsample)
    score_chunk_pairs: int = 16384  # serving on CPU: requests are scored in groups of about this
    #                                 many (request, candidate) pairs, so the per-pair
    #                                 intermediates stay in cache (~2x faster than one huge call)
    # serving on a GPU: the same, larger. Each group costs the same few hundred kernel launches
    # whatever its size, and those, not the arithmetic, set the time there: on an H200, Toys
    # 256 x 1,000 in 16 groups of 16,384 pairs took 132 ms per batch (experiments/gpu_check.sh)
    score_chunk_pairs_gpu: int = 1 << 18
    # serving: compile the scoring path with torch.compile (Inductor), as the paper's serving
    # does. The first scoring call of a process compiles, then every call runs fused kernels.
    # Toys, full model, one CPU thread, one process (commit 809162b, AVX-512 machine): 236 ->
    # 175 ms per 256 x 1000 batch (1.35x) after a first call of 67 s (cold Inductor cache) or
    # 17 s (warm); an earlier version of the path, on an AVX2 machine: 1.11x after 56-94 s. Off
    # by default: the whole Toys replay of both ESRs scores for less time than it compiles.
    compile: bool = False
    # serving: "int8" quantizes the model's linear layers dynamically after training or loading
    # (`cascade.stages.quantize`; CPU only). GESR's wide layers run once per request or per item
    # (the towers, the MLPG gate projections); its per-pair layers are 16 wide and stay float32,
    # so on CPU it changes the scores slightly and the time not at all (ml-100k, 256 x 250: 0.98x
    # the float32 time, mean |diff| 0.010 of the score spread; experiments/bench_quantize.py)
    quantize: str = "none"
    moa: MoAConfig = field(default_factory=MoAConfig)
    pretrain_towers: bool = True  # phase 1: train the towers alone first (see stage.py)
    pretrain: TrainConfig = field(default_factory=_default_pretrain)
    train: TrainConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        # a table overrides GESR's own defaults (train={"epochs": 2} keeps its other settings)
        moa = from_table(MoAConfig, self.moa, "GESRConfig.moa", MoAConfig())
        object.__setattr__(self, "moa", moa)
        train = from_table(TrainConfig, self.train, "GESRConfig.train", _default_train())
        object.__setattr__(self, "train", train)
        pre = from_table(TrainConfig, self.pretrain, "GESRConfig.pretrain", _default_pretrain())
        object.__setattr__(self, "pretrain", pre)
        for name in ("dim", "hidden", "moa_dim", "n_heads", "cross_heads", "hma_dim",
                     "logit_hidden", "recent",
                     "n_negatives", "valid_negatives", "valid_requests", "score_chunk_pairs",
                     "score_chunk_pairs_gpu"):
            if getattr(self, name) < 1:
                raise ValueError(f"GESRConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_layers < 1:
            raise ValueError(f"GESRConfig.n_layers must be >= 1, got {self.n_layers}")
        for name, heads in (("n_heads", self.n_heads), ("cross_heads", self.cross_heads)):
            if self.moa_dim % heads:
                raise ValueError(
                    f"GESRConfig.moa_dim ({self.moa_dim}) must be divisible by "
                    f"GESRConfig.{name} ({heads})"
                )
        if self.attn_kind not in ATTN_KINDS:
            raise ValueError(
                f"GESRConfig.attn_kind must be one of {list(ATTN_KINDS)}, got {self.attn_kind!r}"
            )
        if self.nro_queries not in NRO_QUERIES:
            raise ValueError(
                f"GESRConfig.nro_queries must be one of {list(NRO_QUERIES)}, got {self.nro_queries!r}"
            )
        if self.impl not in IMPLS:
            raise ValueError(f"GESRConfig.impl must be one of {list(IMPLS)}, got {self.impl!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"GESRConfig.compile must be true or false, got {self.compile!r}")
        check_mode(self.quantize, "GESRConfig.quantize")
        if not isinstance(self.pretrain_towers, bool):
            raise ValueError(f"GESRConfig.pretrain_towers must be true or false, got {self.pretrain_towers!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GESRConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.interest_negatives <= 1.0:
            raise ValueError(
                f"GESRConfig.interest_negatives must be in [0, 1], got {self.interest_negatives}"
            )
        if not 0.0 <= self.pop_negatives <= 1.0:
            raise ValueError(f"GESRConfig.pop_negatives must be in [0, 1], got {self.pop_negatives}")
        if self.aux_weight < 0:
            raise ValueError(f"GESRConfig.aux_weight must be >= 0, got {self.aux_weight}")
