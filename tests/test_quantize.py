"""Dynamic int8 serving (`cascade.stages.quantize`, `quantize = "int8"` on GESR and the LSR):
which layers become int8, the scores against the float32 model's, the config checks, and that
the setting is a serving field (same checkpoint, never a quantized one saved)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from fnmatch import fnmatchcase

import numpy as np
import pytest
import torch
from torch import nn

from cascade.data.traffic import Traffic
from cascade.stages.gesr import GESRConfig, GESRStage
from cascade.stages.lsr import LateStageRanker, LSRConfig
from cascade.stages.quantize import (
    MIN_FEATURES, check_device, is_quantized, quantizable, quantize_linears,
)
from cascade.stages.training import TrainConfig

from stage_data import fit_context, tiny_dataset

# towers 32 wide: the smallest GESR with layers that qualify (MIN_FEATURES)
GESR = GESRConfig(
    dim=32, hidden=32, moa_dim=8, logit_hidden=8, hma_dim=4, valid_requests=150,
    pretrain=dict(epochs=2, batch_size=256, max_steps_per_epoch=20, lr=5e-3),
    train=dict(epochs=2, batch_size=128, max_steps_per_epoch=20, patience=3, lr=5e-3),
)
LSR = LSRConfig(
    dim=32, hidden=64, train=TrainConfig(epochs=5, batch_size=32, lr=4e-3, max_steps_per_epoch=20),
    pretrain=TrainConfig(epochs=4, batch_size=64, lr=3e-3, max_steps_per_epoch=10),
)
STAGES = {"gesr": (GESRStage, GESR), "lsr": (LateStageRanker, LSR)}

# int8 against float32 scores, in units of the score spread (per request, the standard deviation
# of the float scores over its 40 candidates, averaged). Measured on these fixtures: GESR (only
# its towers and gate projections are wide enough) mean |diff| 0.0037, max 0.020, every layer
# int8 0.0054 and 0.026; the LSR 0.025 and 0.12. The bounds leave about 3x that; weights
# quantized with a wrong scale or a dropped bias land far outside.
TOLERANCE = {"gesr": {"mean": 0.015, "max": 0.06}, "lsr": {"mean": 0.08, "max": 0.35}}
# ranks: measured mean Spearman 0.9998 (GESR) and 0.9987 (LSR), top-10 overlap 0.995 and 0.988
MIN_SPEARMAN, MIN_TOP10 = 0.99, 0.9


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, one_thread):
    return fit_context(tiny_dataset(), max_len=20, cache_dir=tmp_path_factory.mktemp("q-cache"))


@pytest.fixture(scope="module")
def scored(ctx):
    """A test batch and 40 distinct random candidates per request."""
    test = Traffic(ctx.dataset, ctx.split.test, max_len=ctx.train.max_len)
    batch = test.batch(np.arange(0, len(test), 3))
    gen = torch.Generator().manual_seed(0)
    cand = torch.stack([torch.randperm(ctx.dataset.n_items, generator=gen)[:40]
                        for _ in range(len(batch))])
    return batch, cand


@pytest.fixture(scope="module")
def fitted(ctx):
    """name -> (float32 stage, int8 stage): the int8 one fitted second, from the cache."""
    out = {}
    for name, (cls, cfg) in STAGES.items():
        out[name] = (cls(cfg).fit(ctx), cls(replace(cfg, quantize="int8")).fit(ctx))
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, n) x (B, n) -> (B,) rank correlation per row (no ties in float scores)."""
    ra, rb = (x.argsort(1).argsort(1).float() for x in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    ta, tb = a.topk(k, 1).indices.tolist(), b.topk(k, 1).indices.tolist()
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


def check_close(name: str, want: torch.Tensor, got: torch.Tensor) -> None:
    spread = float(want.std(dim=1).mean())
    diff = (got - want).abs()
    assert float(diff.mean()) <= TOLERANCE[name]["mean"] * spread, (float(diff.mean()), spread)
    assert float(diff.max()) <= TOLERANCE[name]["max"] * spread, (float(diff.max()), spread)
    assert float(spearman(want, got).mean()) >= MIN_SPEARMAN
    assert top_overlap(want, got) >= MIN_TOP10


# ---- the function ------------------------------------------------------------------------------


def test_quantize_linears_wide_layers_only_without_warnings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.SiLU(), nn.Linear(48, 16), nn.Linear(16, 32),
                          nn.Linear(32, 32)).eval()
    x = torch.randn(500, 64)
    want = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch's deprecation warnings would all show here
        names = quantize_linears(model, skip=("4",))
        got = model(x)
    assert [str(w.message)[:60] for w in caught] == []
    # 48 -> 16 and 16 -> 32 are narrower than MIN_FEATURES on one side, "4" is skipped by name
    assert MIN_FEATURES == 32 and names == ["0"]
    assert is_quantized(model[0]) and model[0].weight().dtype == torch.qint8
    assert [type(model[i]) for i in (2, 3, 4)] == [nn.Linear] * 3
    err = (got - want).abs().max()
    # int8 rounding of random weights and inputs: measured 0.044 of the output's spread
    assert 0 < err < 0.1 * want.std()


def test_quantize_linears_refuses_what_it_cannot_do():
    narrow = nn.Sequential(nn.Linear(16, 16), nn.Linear(64, 1))
    with pytest.raises(ValueError, match=r"LSRConfig\.quantize = 'int8': no nn.Linear .* at least 32"):
        quantize_linears(narrow, field="LSRConfig.quantize")
    with pytest.raises(ValueError, match=r"GESRConfig\.quantize = 'int8' serves on CPU only.*meta"):
        quantize_linears(nn.Linear(64, 64, device="meta"), field="GESRConfig.quantize")
    with pytest.raises(ValueError, match=r"X\.quantize = 'int8' serves on CPU only.*cuda:0"):
        check_device("int8", "cuda:0", "X.quantize")
    check_device("none", "cuda:0", "X.quantize")  # float serving: any device


@pytest.mark.parametrize("make,field", [(GESRConfig, "GESRConfig"), (LSRConfig, "LSRConfig")])
@pytest.mark.parametrize("bad", ["fp8", "INT8", True, None])
def test_config_rejects_unknown_modes(make, field, bad):
    with pytest.raises(ValueError, match=rf"{field}\.quantize must be one of \['none', 'int8'\], got {bad!r}"):
        make(quantize=bad)
    assert make().quantize == "none" and make(quantize="int8").quantize == "int8"


def test_stage_refuses_int8_on_a_gpu_before_training(ctx, tmp_path):
    cuda = replace(ctx, device=torch.device("cuda"), cache_dir=tmp_path)
    for cls, cfg in STAGES.values():
        stage = cls(replace(cfg, quantize="int8"))
        with pytest.raises(ValueError, match=r"Config\.quantize = 'int8' serves on CPU only.*cuda"):
            stage.fit(cuda)
        assert stage.model_ is None
    assert list(tmp_path.iterdir()) == []  # nothing trained, no checkpoint written


# ---- the stages --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STAGES)
def test_int8_stage_serves_int8_layers(fitted, name):
    flt, q8 = fitted[name]
    want = quantizable(flt.model_, skip=type(flt).float_linears)
    got = [n for n, m in q8.model_.named_modules() if is_quantized(m)]
    assert got == want and len(got) >= 3
    for n in got:
        assert q8.model_.get_submodule(n).weight().dtype == torch.qint8
    kept = [m for n, m in q8.model_.named_modules()
            if any(fnmatchcase(n, p) for p in type(flt).float_linears)]
    assert kept and all(type(m) is nn.Linear for m in kept)  # `float_linears` stay float32
    assert not any(is_quantized(m) for m in flt.model_.modules())  # "none": untouched


@pytest.mark.parametrize("name", STAGES)
def test_int8_scores_within_tolerance(fitted, scored, name):
    flt, q8 = fitted[name]
    batch, cand = scored
    want, got = flt.score(batch, cand), q8.score(batch, cand)
    assert not torch.equal(want, got)
    check_close(name, want, got)


@pytest.mark.parametrize("name", STAGES)
def test_every_linear_layer_int8_still_serves(ctx, fitted, scored, name):
    """Quantizing every layer but `float_linears`, however narrow: the serving path still runs
    (so `float_linears` names every layer whose weights it reads) and stays within tolerance."""
    flt, _ = fitted[name]
    cls, cfg = STAGES[name]
    stage = cls(cfg).fit(ctx)  # the cached checkpoint
    names = quantize_linears(stage.model_, skip=cls.float_linears, min_features=1)
    assert len(names) > len(quantizable(flt.model_, skip=cls.float_linears))
    batch, cand = scored
    check_close(name, flt.score(batch, cand), stage.score(batch, cand))


@pytest.mark.parametrize("name", STAGES)
def test_quantize_is_a_serving_field(fitted, name):
    flt, q8 = fitted[name]
    assert "quantize" in type(flt).serving_fields
    assert flt.fit_report_["cached"] is False and q8.fit_report_["cached"] is True
    assert q8.fit_report_["checkpoint"] == flt.fit_report_["checkpoint"]


def test_int8_fit_saves_the_float_checkpoint(ctx, scored, fitted, tmp_path):
    """A quantized stage that trains saves the float32 weights: a float stage loading them
    scores exactly as one that trained itself."""
    fresh = replace(ctx, cache_dir=tmp_path)
    q8 = GESRStage(replace(GESR, quantize="int8")).fit(fresh)
    assert q8.fit_report_["cached"] is False
    state = torch.load(f"{q8.fit_report_['checkpoint']}/model.pt", weights_only=True)
    flt = fitted["gesr"][0]
    assert state.keys() == flt.model_.state_dict().keys()
    assert all(not t.is_quantized and t.dtype in (torch.float32, torch.int64) for t in state.values())
    loaded = GESRStage(replace(GESR, quantize="none")).fit(fresh)
    assert loaded.fit_report_["cached"] is True
    batch, cand = scored
    assert torch.equal(loaded.score(batch, cand), flt.score(batch, cand))


def test_ablation_has_the_int8_row_on_cpu_only():
    from cascade.ablation import build_ablation_config

    def variants(device):
        return {v.label: v for v in build_ablation_config(None, {"device": device}).esr_variants}

    cpu = variants("cpu")
    assert list(cpu)[5:7] == ["+MLPG (full GESR)", "full GESR, int8"]
    assert cpu["full GESR, int8"].config == {**cpu["+MLPG (full GESR)"].config, "quantize": "int8"}
    assert "full GESR, int8" not in variants("cuda")  # int8 dynamic quantization: CPU kernels only
