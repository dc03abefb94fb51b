"""Target-aware attention: a request's history plus its candidates under the target mask.

Follows the "Target-Aware Self Attention" of GESR (Hong et al., arXiv 2511.21095) with HSTU's
pointwise attention (Zhai et al., arXiv 2402.17152), in the generative-recommenders kernel
pattern: one public op with three implementations that must agree.

The sequence of request b is [h_0 .. h_{N-1} ; c_0 .. c_{n-1}], history left-aligned and
right-padded (positions < hist_len[b] are real). The target mask:

- history token i attends causally to history 0..i and never to candidates;
- candidate j attends to every valid history token and to itself, never to other candidates.

Attention kinds, with scale 1/sqrt(d):

- "silu" (HSTU): weight SiLU(q.k * scale) divided by the number of attended tokens (i+1 for
  history token i, hist_len+1 for a candidate), so results do not depend on padding;
- "softmax": ordinary softmax over the attended set.

Modes: *full* (q_h given: history outputs are computed too) and *cached-history* (q_h None: the
history K/V were computed once per request, e.g. by `cascade.stages.hstu.encode_history`, and only
the candidates' outputs are needed). Padded history rows of out_h are 0.

Implementations (`impl=`):

- "ref": the specification. For every candidate it builds the full sequence [valid history ;
  that candidate] and runs plain causal attention over it in fp32: O(n * N^2 * d). Slow; tests.
- "torch": the decomposition. Candidate-to-history scores (B,H,n,N) in one batched matmul plus the
  diagonal self term, and the history once with a causal mask: O(N^2 d + n N d). Differentiable:
  **training goes through this path with autograd.**
- "triton": `cascade.kernels._target_attention_triton`. One program per (request, head, block of
  candidates) loads each history K/V block once for the whole candidate block, streams over the
  history with an online softmax (or a running sum for silu), adds the self term and never
  computes candidate-to-candidate blocks; full mode adds causal programs for the history rows.
  **Forward only** (no backward kernel): do not use it where gradients are needed.
- "auto": triton when the tensors are on CUDA and no gradient is needed, torch otherwise (so a
  training step on CUDA still gets gradients). impl="triton" with inputs that require grad (and
  grad mode on) is an error rather than a silent loss of gradients.

All implementations accumulate in fp32 and return the input dtype (fp32, fp16, bf16; the Triton
interpreter on CPU handles fp32 and fp16 only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("silu", "softmax")
IMPLS = ("auto", "triton", "torch", "ref")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def target_aware_attention(
    q_c: Tensor,
    k_c: Tensor,
    v_c: Tensor,
    k_h: Tensor,
    v_h: Tensor,
    hist_len: Tensor,
    *,
    q_h: Tensor | None = None,
    kind: str = "silu",
    impl: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Attention of candidates (and optionally history) under the target mask.

    q_c, k_c, v_c: (B, H, n, d) candidates; k_h, v_h (and q_h): (B, H, N, d) history;
    hist_len: (B,) integer, values in [0, N]. Returns (out_c (B,H,n,d), out_h (B,H,N,d) or None
    when q_h is None). Inputs may be non-contiguous views (e.g. heads split by a transpose).
    Gradients: use impl "torch" (or "ref"); "triton" is forward only.
    """
    _check(q_c, k_c, v_c, k_h, v_h, hist_len, q_h, kind, impl)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q_c, k_c, v_c, k_h, v_h, q_h)
    )
    if impl == "auto":
        impl = "triton" if q_c.is_cuda and not needs_grad else "torch"
    if impl == "triton" and needs_grad:
        raise ValueError(
            "target_aware_attention: impl='triton' is forward only and these inputs require grad; "
            "use impl='torch' (or 'auto') for training, or run under torch.no_grad()"
        )
    if impl == "ref":
        return _ref(q_c, k_c, v_c, k_h, v_h, hist_len, q_h=q_h, kind=kind)
    if impl == "torch":
        return _torch(q_c, k_c, v_c, k_h, v_h, hist_len, q_h=q_h, kind=kind)
    from cascade.kernels._target_attention_triton import target_attention_triton

    return target_attention_triton(q_c, k_c, v_c, k_h, v_h, hist_len, q_h=q_h, kind=kind)


def _check(q_c, k_c, v_c, k_h, v_h, hist_len, q_h, kind, impl) -> None:
    if kind not in KINDS:
        raise ValueError(f"target_aware_attention: kind must be one of {KINDS}, got {kind!r}")
    if impl not in IMPLS:
        raise ValueError(f"target_aware_attention: impl must be one of {IMPLS}, got {impl!r}")
    named = {"q_c": q_c, "k_c": k_c, "v_c": v_c, "k_h": k_h, "v_h": v_h}
    if q_h is not None:
        named["q_h"] = q_h
    for name, t in named.items():
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"target_aware_attention: {name} must be a 4-d tensor (B, H, L, d), got {got}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"target_aware_attention: {name} has dtype {t.dtype}, expected one of {_DTYPES}")
        if t.dtype != q_c.dtype or t.device != q_c.device:
            raise ValueError(
                f"target_aware_attention: {name} is {t.dtype} on {t.device} but q_c is "
                f"{q_c.dtype} on {q_c.device}; all inputs must share dtype and device"
            )
    B, H, n, d = q_c.shape
    N = k_h.shape[2]
    for name in ("k_c", "v_c"):
        if tuple(named[name].shape) != (B, H, n, d):
            raise ValueError(f"target_aware_attention: {name} has shape {tuple(named[name].shape)}, expected q_c's {(B, H, n, d)}")
    for name in ("v_h", "q_h"):
        if name in named and tuple(named[name].shape) != (B, H, N, d):
            raise ValueError(f"target_aware_attention: {name} has shape {tuple(named[name].shape)}, expected {(B, H, N, d)} (k_h's)")
    if tuple(k_h.shape) != (B, H, N, d):
        raise ValueError(f"target_aware_attention: k_h has shape {tuple(k_h.shape)}, expected (B, H, N, d) = ({B}, {H}, N, {d})")
    if d < 1:
        raise ValueError("target_aware_attention: head dim d must be >= 1")
    if not isinstance(hist_len, Tensor) or hist_len.shape != (B,) or hist_len.dtype.is_floating_point or hist_len.dtype == torch.bool:
        got = (tuple(hist_len.shape), hist_len.dtype) if isinstance(hist_len, Tensor) else type(hist_len).__name__
        raise ValueError(f"target_aware_attention: hist_len must be an integer tensor of shape ({B},), got {got}")
    if hist_len.device != q_c.device:
        raise ValueError(f"target_aware_attention: hist_len is on {hist_len.device}, inputs on {q_c.device}")
    if B and bool(((hist_len < 0) | (hist_len > N)).any()):
        lo, hi = int(hist_len.min()), int(hist_len.max())
        raise ValueError(f"target_aware_attention: hist_len values must lie in [0, N={N}], got min {lo} max {hi}")


# ---------------------------------------------------------------------------------------------
# Plain masked attention: the one definition of the math, shared by `_ref` and the encoder's
# naive per-candidate path (`cascade.stages.hstu.TargetAwareEncoder.forward_naive`).
# ---------------------------------------------------------------------------------------------


def dense_masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, kind: str) -> Tensor:
    """Attention of q (..., T, d) over k, v (..., S, d) with a boolean mask (..., T, S), True =
    attended. silu: SiLU(scores)/count(attended); softmax over the attended set. Rows with
    nothing attended give 0. Computed in the inputs' dtype (callers pass fp32)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (..., T, S)
    if kind == "silu":
        count = mask.sum(-1, keepdim=True).clamp(min=1)
        w = F.silu(s) * mask / count
    elif kind == "softmax":
        w = torch.softmax(s.masked_fill(~mask, torch.finfo(s.dtype).min), dim=-1)
        w = w * mask  # rows with nothing attended: 0, not uniform
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return w @ v


def _ref(q_c, k_c, v_c, k_h, v_h, hist_len, *, q_h=None, kind="silu"):
    """The specification: for each candidate, the sequence [valid history ; candidate] under a
    plain causal mask (the candidate is last, so causal = target mask), in fp32. The history
    outputs are that sequence's first hist_len rows (the same for every candidate, so computed
    once from the history alone)."""
    dtype = q_c.dtype
    B, H, n, d = q_c.shape
    N = k_h.shape[2]
    f = lambda t: t.float()  # noqa: E731
    outs_c, outs_h = [], []
    for b in range(B):
        L = int(hist_len[b])
        # (H, n, L+1, d): every candidate gets its own copy of the history
        kh = f(k_h[b, :, :L]).unsqueeze(1).expand(H, n, L, d)
        vh = f(v_h[b, :, :L]).unsqueeze(1).expand(H, n, L, d)
        k_seq = torch.cat([kh, f(k_c[b]).unsqueeze(2)], dim=2)
        v_seq = torch.cat([vh, f(v_c[b]).unsqueeze(2)], dim=2)
        causal = torch.ones(L + 1, L + 1, dtype=torch.bool, device=q_c.device).tril()
        if q_h is not None:
            qh = f(q_h[b, :, :L]).unsqueeze(1).expand(H, n, L, d)
            q_seq = torch.cat([qh, f(q_c[b]).unsqueeze(2)], dim=2)
            o = dense_masked_attention(q_seq, k_seq, v_seq, causal, kind=kind)  # (H, n, L+1, d)
            out_c = o[:, :, L]
            # history rows: causal attention over the history alone (identical rows of o)
            hist = dense_masked_attention(
                f(q_h[b, :, :L]), f(k_h[b, :, :L]), f(v_h[b, :, :L]), causal[:L, :L], kind=kind
            )  # (H, L, d)
            outs_h.append(F.pad(hist, (0, 0, 0, N - L)))
        else:
            q_last = f(q_c[b]).unsqueeze(2)  # (H, n, 1, d): only the candidate row is needed
            out_c = dense_masked_attention(q_last, k_seq, v_seq, causal[L:], kind=kind)[:, :, 0]
        outs_c.append(out_c)
    out_c = torch.stack(outs_c).to(dtype) if B else q_c.new_zeros(q_c.shape)
    out_h = None
    if q_h is not None:
        out_h = torch.stack(outs_h).to(dtype) if B else q_h.new_zeros(q_h.shape)
    return out_c, out_h


def _torch(q_c, k_c, v_c, k_h, v_h, hist_len, *, q_h=None, kind="silu"):
    """The decomposed, batched path (differentiable; used for training and on CPU)."""
    dtype = q_c.dtype
    q_c, k_c, v_c, k_h, v_h = (t.float() for t in (q_c, k_c, v_c, k_h, v_h))
    N, d = k_h.shape[2], k_h.shape[3]
    scale = 1.0 / math.sqrt(d)
    pos = torch.arange(N, device=q_c.device)
    valid = pos[None, :] < hist_len[:, None]  # (B, N)

    if kind == "silu":
        # silu weights need no normalisation across keys, so the (B,H,n,N) score tensor is
        # touched by the two matmuls and one SiLU only: the scale goes into q (n*d, not n*N,
        # multiplies), padded keys are removed by zeroing their values (SiLU(s) * 0 = 0), and
        # the division by the attended count is applied to the (B,H,n,d) output
        q_s = q_c * scale
        s_hist = q_s @ k_h.transpose(-1, -2)  # (B, H, n, N)
        # in place only without autograd (SiLU's backward needs its input)
        w_hist = F.silu(s_hist, inplace=not torch.is_grad_enabled())
        s_self = F.silu((q_s * k_c).sum(-1, keepdim=True))  # (B, H, n, 1)
        v_valid = v_h * valid[:, None, :, None].to(v_h.dtype)
        out_c = (w_hist @ v_valid + s_self * v_c) / (hist_len.to(v_c.dtype) + 1)[:, None, None, None]
    else:
        # candidates: history part (B,H,n,N) and the diagonal self term (B,H,n,1), side by side
        s_hist = (q_c @ k_h.transpose(-1, -2)) * scale
        s_self = (q_c * k_c).sum(-1, keepdim=True) * scale
        s = torch.cat([s_hist, s_self], dim=-1)  # (B, H, n, N+1)
        keep = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=-1)[:, None, None, :]
        w = torch.softmax(s.masked_fill(~keep, torch.finfo(s.dtype).min), dim=-1)
        out_c = w[..., :N] @ v_h + w[..., N:] * v_c

    out_h = None
    if q_h is not None:
        q_h = q_h.float()
        causal = pos[None, :] <= pos[:, None]  # (N, N) key <= query
        mask = causal[None] & valid[:, None, :] & valid[:, :, None]  # (B, N, N)
        out_h = dense_masked_attention(q_h, k_h, v_h, mask[:, None], kind=kind).to(dtype)
    return out_c.to(dtype), out_h
