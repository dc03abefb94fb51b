"""TargetAwareEncoder: the cached-history decomposition equals one full sequence per candidate,
and history / candidate outputs have the independence the target mask promises."""

import pytest
import torch

from cascade.stages.hstu import HistoryState, TargetAwareEncoder
from tolerances import tol

F32 = tol(torch.float32)
IMPLS = ["torch", "triton"]


def make(kind="silu", dim=32, n_layers=2, n_heads=2, seed=0):
    torch.manual_seed(seed)
    enc = TargetAwareEncoder(dim, n_layers, n_heads, kind=kind).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    B, N, n = 3, 7, 5
    hist = torch.randn(B, N, dim, generator=gen)
    cand = torch.randn(B, n, dim, generator=gen)
    hist_len = torch.tensor([7, 0, 4])
    return enc, hist, hist_len, cand


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["silu", "softmax"])
def test_forward_equals_one_sequence_per_candidate(kind, impl):
    enc, hist, hist_len, cand = make(kind)
    with torch.no_grad():
        _, cand_out = enc(hist, hist_len, cand, impl=impl)
        naive = enc.forward_naive(hist, hist_len, cand)
    assert cand_out.shape == cand.shape
    torch.testing.assert_close(cand_out, naive, **F32)


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_then_score_equals_forward(impl):
    enc, hist, hist_len, cand = make("silu")
    with torch.no_grad():
        hist_out, cand_out = enc(hist, hist_len, cand, impl="torch")
        state = enc.encode_history(hist, hist_len, impl=impl)
        scored = enc.score_candidates(state, cand, impl=impl)
    assert isinstance(state, HistoryState) and len(state.keys) == 2 and len(state) == 3
    torch.testing.assert_close(state.output, hist_out, **F32)
    torch.testing.assert_close(scored, cand_out, **F32)
    # padded history rows are zero, real ones are not
    assert (hist_out[1] == 0).all() and (hist_out[2, 4:] == 0).all()
    assert hist_out[2, :4].abs().sum() > 0


def test_history_outputs_do_not_depend_on_candidates():
    enc, hist, hist_len, cand = make("softmax")
    with torch.no_grad():
        h1, _ = enc(hist, hist_len, cand)
        h2, _ = enc(hist, hist_len, cand[:, [3, 1]])  # remove and permute
        h3, _ = enc(hist, hist_len, torch.cat([cand, -cand], dim=1))  # add
    torch.testing.assert_close(h2, h1, **F32)
    torch.testing.assert_close(h3, h1, **F32)


def test_candidate_output_does_not_depend_on_other_candidates():
    enc, hist, hist_len, cand = make("silu")
    with torch.no_grad():
        _, c1 = enc(hist, hist_len, cand)
        perm = torch.tensor([2, 4, 0])
        _, c2 = enc(hist, hist_len, cand[:, perm])
    torch.testing.assert_close(c2, c1[:, perm], **F32)


def test_candidate_output_depends_on_history():
    """A check that could fail: the candidate output must change when its history changes."""
    enc, hist, hist_len, cand = make("silu")
    with torch.no_grad():
        _, c1 = enc(hist, hist_len, cand)
        _, c2 = enc(hist.flip(1), hist_len, cand)
        _, c3 = enc(hist, torch.tensor([7, 0, 2]), cand)
    assert not torch.allclose(c1[0], c2[0], atol=1e-3)  # order matters (causal history)
    torch.testing.assert_close(c1[1], c2[1], **F32)  # empty history: nothing to change
    assert not torch.allclose(c1[2], c3[2], atol=1e-3)


def test_training_gradients_flow_through_torch_path():
    enc, hist, hist_len, cand = make("silu")
    enc.train()
    hist.requires_grad_()
    hist_out, cand_out = enc(hist, hist_len, cand)  # impl auto -> torch on CPU
    (cand_out.square().mean() + hist_out.square().mean()).backward()
    assert all(p.grad is not None for p in enc.parameters())
    assert hist.grad[0].abs().sum() > 0
    assert (hist.grad[1] == 0).all()  # an empty history has no influence on anything


def test_state_select_and_impl_attribute():
    enc, hist, hist_len, cand = make("silu")
    enc.impl = "triton"
    with torch.no_grad():
        state = enc.encode_history(hist, hist_len)
        sub = enc.score_candidates(state.select(torch.tensor([2, 0])), cand[[2, 0]])
        full = enc.score_candidates(state, cand, impl="ref")
    torch.testing.assert_close(sub, full[[2, 0]], **F32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 30, "n_heads": 4}, "multiple of n_heads"),
        ({"n_layers": 0}, "n_layers"),
        ({"kind": "relu"}, "kind must be one of"),
        ({"dropout": 1.0}, "dropout"),
        ({"impl": "gpu"}, "impl must be one of"),
    ],
)
def test_bad_config_raises(kwargs, message):
    args = {"dim": 32, "n_layers": 1, "n_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        TargetAwareEncoder(args.pop("dim"), args.pop("n_layers"), args.pop("n_heads"), **args)


def test_bad_inputs_raise():
    enc, hist, hist_len, cand = make("silu")
    with pytest.raises(ValueError, match="hist must be"):
        enc(hist[..., :16], hist_len, cand)
    with pytest.raises(ValueError, match="batch"):
        enc(hist, hist_len, cand[:2])
    with pytest.raises(ValueError, match="hist_len must have shape"):
        enc(hist, hist_len[:2], cand)
    state = enc.encode_history(hist, hist_len)
    with pytest.raises(ValueError, match="state has"):
        enc.score_candidates(state, cand[:1])


@pytest.mark.gpu
def test_encoder_on_cuda_with_triton_equals_torch():
    enc, hist, hist_len, cand = make("softmax")
    enc = enc.cuda()
    hist, hist_len, cand = hist.cuda(), hist_len.cuda(), cand.cuda()
    with torch.no_grad():
        h1, c1 = enc(hist, hist_len, cand, impl="torch")
        h2, c2 = enc(hist, hist_len, cand, impl="triton")
    torch.testing.assert_close(h2, h1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c2, c1, atol=1e-4, rtol=1e-4)
