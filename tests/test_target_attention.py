"""Target-aware attention: the decomposed torch path and the Triton kernel (through
TRITON_INTERPRET=1 on CPU) equal the per-candidate reference `_ref`; `_ref` itself is checked
against scaled_dot_product_attention and hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from cascade.kernels.target_attention import _ref, target_aware_attention
from tolerances import tol

FAST_IMPLS = ["torch", "triton"]

# (B, H, N, n, d): size 1 everywhere, non-powers of two, one and many candidates
SHAPES = [
    (1, 1, 1, 1, 16),
    (3, 2, 7, 5, 16),
    (3, 2, 33, 17, 32),
    (1, 2, 33, 1, 32),
    (3, 1, 1, 17, 16),
]


def lengths(kind: str, B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "empty":
        return torch.zeros(B, dtype=torch.int64)
    if kind == "full":
        return torch.full((B,), N, dtype=torch.int64)
    # mixed: empty, full and random lengths in one batch
    lens = torch.randint(0, N + 1, (B,), generator=gen)
    lens[0] = N
    if B > 1:
        lens[1] = 0
    return lens


def make_inputs(B, H, N, n, d, dtype, lens_kind, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    r = lambda L: torch.randn(B, H, L, d, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    q_c, k_c, v_c, q_h, k_h, v_h = r(n), r(n), r(n), r(N), r(N), r(N)
    return q_c, k_c, v_c, q_h, k_h, v_h, lengths(lens_kind, B, N, gen).to(device)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["full", "cached"])
@pytest.mark.parametrize("kind", ["silu", "softmax"])
@pytest.mark.parametrize("lens_kind", ["empty", "full", "mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_paths_equal_ref(shape, lens_kind, kind, mode, dtype, impl):
    q_c, k_c, v_c, q_h, k_h, v_h, hl = make_inputs(*shape, dtype, lens_kind, seed=sum(shape))
    q_h = q_h if mode == "full" else None
    want_c, want_h = _ref(q_c, k_c, v_c, k_h, v_h, hl, q_h=q_h, kind=kind)
    got_c, got_h = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, q_h=q_h, kind=kind, impl=impl)
    assert got_c.dtype == dtype and got_c.shape == q_c.shape
    torch.testing.assert_close(got_c, want_c, **tol(dtype))
    if mode == "cached":
        assert got_h is None
    else:
        assert got_h.dtype == dtype and got_h.shape == k_h.shape
        torch.testing.assert_close(got_h, want_h, **tol(dtype))


@pytest.mark.parametrize("impl", ["ref"] + FAST_IMPLS)
def test_padding_content_is_ignored_and_padded_rows_are_zero(impl):
    q_c, k_c, v_c, q_h, k_h, v_h, hl = make_inputs(3, 2, 9, 4, 16, torch.float32, "mixed", seed=3)
    out_c, out_h = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, q_h=q_h, kind="softmax", impl=impl)
    pad = (torch.arange(9)[None, :] >= hl[:, None])[:, None, :, None]  # (B, 1, N, 1)
    junk = lambda t: torch.where(pad, torch.full_like(t, 1e4), t)  # noqa: E731
    out_c2, out_h2 = target_aware_attention(
        q_c, k_c, v_c, junk(k_h), junk(v_h), hl, q_h=junk(q_h), kind="softmax", impl=impl
    )
    torch.testing.assert_close(out_c2, out_c, **tol(torch.float32))
    torch.testing.assert_close(out_h2, out_h, **tol(torch.float32))
    assert (out_h.masked_select(pad) == 0).all()
    assert out_h.masked_select(~pad).abs().sum() > 0


@pytest.mark.parametrize("impl", ["ref"] + FAST_IMPLS)
def test_empty_history_is_the_self_term(impl):
    q_c, k_c, v_c, _, k_h, v_h, hl = make_inputs(2, 2, 5, 3, 16, torch.float32, "empty", seed=4)
    s = (q_c * k_c).sum(-1, keepdim=True) / math.sqrt(16)
    silu, _ = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, kind="silu", impl=impl)
    torch.testing.assert_close(silu, F.silu(s) * v_c, **tol(torch.float32))
    soft, _ = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, kind="softmax", impl=impl)
    torch.testing.assert_close(soft, v_c, **tol(torch.float32))


def test_ref_softmax_matches_sdpa_on_explicit_sequences():
    """The reference against PyTorch's own attention on [history ; all candidates] with the
    target mask written out as a dense boolean matrix."""
    B, H, N, n, d = 2, 2, 6, 4, 16
    q_c, k_c, v_c, q_h, k_h, v_h, _ = make_inputs(B, H, N, n, d, torch.float32, "full", seed=5)
    hl = torch.tensor([6, 2])
    out_c, out_h = _ref(q_c, k_c, v_c, k_h, v_h, hl, q_h=q_h, kind="softmax")
    for b in range(B):
        L = int(hl[b])
        q = torch.cat([q_h[b, :, :L], q_c[b]], dim=1)
        k = torch.cat([k_h[b, :, :L], k_c[b]], dim=1)
        v = torch.cat([v_h[b, :, :L], v_c[b]], dim=1)
        m = torch.zeros(L + n, L + n, dtype=torch.bool)
        m[:L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
        m[L:, :L] = True
        m[L:, L:] = torch.eye(n, dtype=torch.bool)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(out_h[b, :, :L], want[:, :L], **tol(torch.float32))
        torch.testing.assert_close(out_c[b], want[:, L:], **tol(torch.float32))


def test_ref_silu_by_hand():
    """One candidate, history of 2: w_j = SiLU(q.k_j/sqrt(d)) / 3 over {h0, h1, self}."""
    d = 16
    q_c, k_c, v_c, q_h, k_h, v_h, _ = make_inputs(1, 1, 3, 1, d, torch.float32, "full", seed=6)
    hl = torch.tensor([2])
    out_c, out_h = _ref(q_c, k_c, v_c, k_h, v_h, hl, q_h=q_h, kind="silu")
    keys = torch.stack([k_h[0, 0, 0], k_h[0, 0, 1], k_c[0, 0, 0]])
    vals = torch.stack([v_h[0, 0, 0], v_h[0, 0, 1], v_c[0, 0, 0]])
    w = F.silu(keys @ q_c[0, 0, 0] / math.sqrt(d)) / 3
    torch.testing.assert_close(out_c[0, 0, 0], w @ vals, **tol(torch.float32))
    w1 = F.silu(k_h[0, 0, :2] @ q_h[0, 0, 1] / math.sqrt(d)) / 2  # history token 1 sees h0, h1
    torch.testing.assert_close(out_h[0, 0, 1], w1 @ v_h[0, 0, :2], **tol(torch.float32))


@pytest.mark.parametrize("impl", ["ref"] + FAST_IMPLS)
def test_candidates_are_independent(impl):
    """Permuting or dropping candidates permutes or drops their outputs, nothing else."""
    q_c, k_c, v_c, q_h, k_h, v_h, hl = make_inputs(2, 2, 7, 6, 16, torch.float32, "mixed", seed=7)
    out, _ = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, kind="silu", impl=impl)
    perm = torch.tensor([4, 0, 5, 2])
    sub, _ = target_aware_attention(
        q_c[:, :, perm], k_c[:, :, perm], v_c[:, :, perm], k_h, v_h, hl, kind="silu", impl=impl
    )
    torch.testing.assert_close(sub, out[:, :, perm], **tol(torch.float32))


@pytest.mark.parametrize("mode", ["full", "cached"])
@pytest.mark.parametrize("kind", ["silu", "softmax"])
def test_torch_gradients_equal_ref(kind, mode):
    B, H, N, n, d = 3, 2, 7, 5, 16
    inputs = make_inputs(B, H, N, n, d, torch.float32, "mixed", seed=8)
    *tensors, hl = inputs
    if mode == "cached":
        tensors[3] = None  # q_h
    gen = torch.Generator().manual_seed(9)
    g_c = torch.randn(B, H, n, d, generator=gen)
    g_h = torch.randn(B, H, N, d, generator=gen)

    def grads(impl):
        ts = [t.clone().requires_grad_() if t is not None else None for t in tensors]
        q_c, k_c, v_c, q_h, k_h, v_h = ts
        out_c, out_h = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, q_h=q_h, kind=kind, impl=impl)
        loss = (out_c * g_c).sum() + ((out_h * g_h).sum() if out_h is not None else 0)
        loss.backward()
        return [t.grad for t in ts if t is not None]

    want, got = grads("ref"), grads("torch")
    for g, w in zip(got, want):
        assert w is not None and w.abs().sum() > 0
        torch.testing.assert_close(g, w, **tol(torch.float32, grad=True))


def test_auto_picks_torch_on_cpu_and_keeps_gradients():
    q_c, k_c, v_c, q_h, k_h, v_h, hl = make_inputs(1, 1, 4, 2, 16, torch.float32, "full", seed=10)
    q_c.requires_grad_()
    out, _ = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl)
    out.sum().backward()
    assert q_c.grad is not None and q_c.grad.abs().sum() > 0


def test_triton_refuses_inputs_that_need_gradients():
    q_c, k_c, v_c, q_h, k_h, v_h, hl = make_inputs(1, 1, 4, 2, 16, torch.float32, "full", seed=11)
    q_c.requires_grad_()
    with pytest.raises(ValueError, match="forward only"):
        target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, impl="triton")
    with torch.no_grad():  # inference under no_grad is fine
        target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, impl="triton")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "kind": "relu"}, "kind must be one of"),
        (lambda a: {**a, "impl": "cuda"}, "impl must be one of"),
        (lambda a: {**a, "k_c": a["k_c"][:, :, :1]}, "k_c has shape"),
        (lambda a: {**a, "v_h": a["v_h"][..., :8]}, "v_h has shape"),
        (lambda a: {**a, "q_h": a["q_h"][:, :, :2]}, "q_h has shape"),
        (lambda a: {**a, "q_c": a["q_c"][0]}, "q_c must be a 4-d tensor"),
        (lambda a: {**a, "v_c": a["v_c"].double()}, "dtype"),
        (lambda a: {**a, "k_h": a["k_h"].half()}, "must share dtype"),
        (lambda a: {**a, "hist_len": torch.tensor([5, 1])}, r"hist_len values must lie in \[0, N=4\]"),
        (lambda a: {**a, "hist_len": torch.tensor([-1, 1])}, "hist_len values"),
        (lambda a: {**a, "hist_len": torch.tensor([1.0, 2.0])}, "integer tensor"),
        (lambda a: {**a, "hist_len": torch.tensor([1])}, "integer tensor of shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    q_c, k_c, v_c, q_h, k_h, v_h, hl = make_inputs(2, 1, 4, 3, 16, torch.float32, "full", seed=12)
    args = dict(q_c=q_c, k_c=k_c, v_c=v_c, k_h=k_h, v_h=v_h, hist_len=hl, q_h=q_h, kind="silu", impl="torch")
    with pytest.raises(ValueError, match=message):
        target_aware_attention(**change(args))


# -- GPU only: the compiled kernel (bf16, large shapes) --------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind", ["silu", "softmax"])
@pytest.mark.parametrize("shape", [(4, 2, 200, 1000, 32), (2, 4, 1000, 300, 64), (3, 2, 257, 129, 32)])
def test_compiled_kernel_equals_torch_path_on_gpu(shape, kind, dtype):
    B, H, N, n, d = shape
    q_c, k_c, v_c, q_h, k_h, v_h, hl = make_inputs(B, H, N, n, d, dtype, "mixed", seed=13, device="cuda")
    want_c, want_h = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, q_h=q_h, kind=kind, impl="torch")
    got_c, got_h = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, q_h=q_h, kind=kind, impl="triton")
    # the torch path (fp32 math) stands in for the ref here, which is too slow at these shapes
    t = tol(dtype) if dtype != torch.float32 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(got_c, want_c, **t)
    torch.testing.assert_close(got_h, want_h, **t)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", ["full", "cached"])
@pytest.mark.parametrize("kind", ["silu", "softmax"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 16), (3, 2, 33, 17, 32), (5, 2, 70, 130, 64)], ids=lambda s: "x".join(map(str, s))
)
def test_compiled_kernel_equals_ref_on_gpu(shape, kind, mode, dtype):
    """The kernel compiled for the GPU against the per-candidate reference computed on the CPU
    (fp32 math) from the same inputs, empty, full and partial histories in one batch: relative
    error of the whole output, every element finite and within the shared tolerances (CPU
    memory: no stale GPU result can pass for one)."""
    q_c, k_c, v_c, q_h, k_h, v_h, hl = make_inputs(*shape, dtype, "mixed", seed=7 + sum(shape), device="cuda")
    q_h = q_h if mode == "full" else None
    up = lambda t: None if t is None else t.cpu().float()  # noqa: E731
    want_c, want_h = _ref(*(up(t) for t in (q_c, k_c, v_c, k_h, v_h)), hl.cpu(), q_h=up(q_h), kind=kind)
    got_c, got_h = target_aware_attention(q_c, k_c, v_c, k_h, v_h, hl, q_h=q_h, kind=kind, impl="triton")
    assert got_c.is_cuda and got_c.dtype == dtype and got_c.shape == q_c.shape
    pairs = [(got_c, want_c)] + ([] if q_h is None else [(got_h, want_h)])
    if q_h is None:
        assert got_h is None
    for got, want in pairs:
        got = got.cpu().double()
        assert torch.isfinite(got).all()
        rel = (got - want.double()).norm() / want.double().norm().clamp_min(1e-12)
        assert rel < (1e-3 if dtype == torch.float32 else 1e-2), f"relative error {rel:.2e}"
        torch.testing.assert_close(got.to(dtype), want.to(dtype), **tol(dtype))
