"""Triton forward kernels for target-aware attention (see `cascade.kernels.target_attention`).

Two kernels, both accumulating in fp32:

- `_cand_fwd`: one program per (request, head, block of BLOCK_M candidates). It loads the block's
  q/k/v once, starts the accumulator with the candidate's own (diagonal) term, then streams over
  the request's *valid* history in BLOCK_N blocks: each history K/V block is loaded once and
  shared by the whole candidate block (one tl.dot each for scores and values). softmax uses an
  online softmax (running max and sum, FlashAttention style); silu a running sum divided by
  hist_len + 1 at the end. Candidate-to-candidate blocks are never formed: the only
  candidate-candidate interaction is the diagonal, a row-wise dot product.
- `_hist_fwd` (full mode only): one program per (request, head, block of history rows), causal
  attention over the history; key blocks beyond the block's last row or beyond hist_len are
  skipped, padded rows are written as 0.

The grid is 1-D (blocks of one (request, head) are adjacent, so their shared history stays in
L2) and every tensor is addressed through its strides, so the heads-split views that
`TargetAwareEncoder` produces need no copies. On CUDA the block sizes are autotuned; under
TRITON_INTERPRET=1 (CPU tests) a single config sized to the inputs is used. The interpreter has
no bf16 and no libdevice, so only tl.exp / tl.sigmoid appear here.

Forward only: training uses the differentiable torch path.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _cand_fwd(
    Qc, Kc, Vc, Kh, Vh, HL, Oc,
    s_qb, s_qh, s_qm, s_qd,
    s_kcb, s_kch, s_kcm, s_kcd,
    s_vcb, s_vch, s_vcm, s_vcd,
    s_khb, s_khh, s_khn, s_khd,
    s_vhb, s_vhh, s_vhn, s_vhd,
    s_ob, s_oh, s_om, s_od,
    H, n_cand, d, scale,
    n_hint, N_hint,  # size buckets: autotuning keys only
    SOFTMAX: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n_cand, BLOCK_M)
    bh = pid // n_blocks
    blk = pid % n_blocks
    b = bh // H
    h = bh % H
    L = tl.load(HL + b)

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md = (offs_m < n_cand)[:, None] & (offs_d < d)[None, :]
    q = tl.load(Qc + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=md, other=0.0)
    kc = tl.load(Kc + b * s_kcb + h * s_kch + offs_m[:, None] * s_kcm + offs_d[None, :] * s_kcd, mask=md, other=0.0)
    vc = tl.load(Vc + b * s_vcb + h * s_vch + offs_m[:, None] * s_vcm + offs_d[None, :] * s_vcd, mask=md, other=0.0)

    # the diagonal: each candidate attends to itself
    s_self = tl.sum(q.to(tl.float32) * kc.to(tl.float32), axis=1) * scale  # (BLOCK_M,)
    if SOFTMAX:
        m_i = s_self  # running max
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)  # running sum of exp(s - m_i); self term = 1
        acc = vc.to(tl.float32)
    else:
        acc = (s_self * tl.sigmoid(s_self))[:, None] * vc.to(tl.float32)

    k_base = Kh + b * s_khb + h * s_khh
    v_base = Vh + b * s_vhb + h * s_vhh
    d_ok = (offs_d < d)[None, :]
    for start in range(0, L, BLOCK_N):  # valid history only: padding is never read
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        nd = n_ok[:, None] & d_ok
        k = tl.load(k_base + offs_n[:, None] * s_khn + offs_d[None, :] * s_khd, mask=nd, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vhn + offs_d[None, :] * s_vhd, mask=nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N) fp32
        if SOFTMAX:
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        else:
            w = tl.where(n_ok[None, :], s * tl.sigmoid(s), 0.0)
            acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION)

    if SOFTMAX:
        out = acc / l_i[:, None]
    else:
        out = acc / (L + 1).to(tl.float32)
    tl.store(
        Oc + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
        out.to(Oc.dtype.element_ty),
        mask=md,
    )


@triton.jit
def _hist_fwd(
    Qh, Kh, Vh, HL, Oh,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    H, N, d, scale,
    N_hint,  # size bucket: autotuning key only
    SOFTMAX: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_M)
    bh = pid // n_blocks
    blk = pid % n_blocks
    b = bh // H
    h = bh % H
    L = tl.load(HL + b)

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < d)[None, :]
    row_ok = offs_m < L
    q = tl.load(
        Qh + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=row_ok[:, None] & d_ok,
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SOFTMAX:
        # finite start so a row with nothing attended (padding) never computes inf - inf
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # causal: keys up to the block's last row, and only valid ones; none for an all-padding block
    hi = tl.minimum(L, (blk + 1) * BLOCK_M)
    hi = tl.where(blk * BLOCK_M < L, hi, 0)
    k_base = Kh + b * s_kb + h * s_kh
    v_base = Vh + b * s_vb + h * s_vh
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        nd = n_ok[:, None] & d_ok
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=nd, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        keep = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :]
        if SOFTMAX:
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        else:
            w = tl.where(keep, s * tl.sigmoid(s), 0.0)
            acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION)

    if SOFTMAX:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    else:
        out = acc / (offs_m + 1).to(tl.float32)[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)  # padded rows are 0
    tl.store(
        Oh + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
        out.to(Oh.dtype.element_ty),
        mask=(offs_m < N)[:, None] & d_ok,
    )


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _bucket(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def _gpu_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (32, 32, 4, 2),
            (64, 32, 4, 2),
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (128, 32, 4, 2),
            (128, 64, 4, 2),
            (128, 64, 8, 2),
            (128, 64, 8, 3),
        ]
    ]


_TUNED: dict[str, object] = {}


def _kernel(name: str):
    """The raw kernel under the interpreter, an autotuned wrapper on a GPU (built once)."""
    raw = {"cand": _cand_fwd, "hist": _hist_fwd}[name]
    if _interpreting():
        return raw
    if name not in _TUNED:
        key = ["n_hint", "N_hint", "BLOCK_D", "SOFTMAX"] if name == "cand" else ["N_hint", "BLOCK_D", "SOFTMAX"]
        _TUNED[name] = triton.autotune(configs=_gpu_configs(), key=key)(raw)
    return _TUNED[name]


def _interp_blocks(rows: int, cols: int) -> dict:
    # one program covers as much as possible: the interpreter's cost is per program and op
    return {
        "BLOCK_M": min(64, max(16, triton.next_power_of_2(max(rows, 1)))),
        "BLOCK_N": min(64, max(16, triton.next_power_of_2(max(cols, 1)))),
    }


def target_attention_triton(
    q_c: Tensor,
    k_c: Tensor,
    v_c: Tensor,
    k_h: Tensor,
    v_h: Tensor,
    hist_len: Tensor,
    *,
    q_h: Tensor | None = None,
    kind: str = "silu",
) -> tuple[Tensor, Tensor | None]:
    """Launch the kernels. Inputs are validated by `target_aware_attention`; call that."""
    B, H, n, d = q_c.shape
    N = k_h.shape[2]
    softmax = kind == "softmax"
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs >= 16 on every side
    precision = "ieee" if q_c.dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32)
    scale = 1.0 / math.sqrt(d)
    hl = hist_len.to(torch.int32).contiguous()
    interp = _interpreting()

    out_c = torch.empty_like(q_c, memory_format=torch.contiguous_format)
    if B * H * n:
        kernel = _kernel("cand")
        extra = _interp_blocks(n, N) if interp else {}
        grid = lambda meta: (B * H * triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
        kernel[grid](
            q_c, k_c, v_c, k_h, v_h, hl, out_c,
            *q_c.stride(), *k_c.stride(), *v_c.stride(), *k_h.stride(), *v_h.stride(), *out_c.stride(),
            H, n, d, scale, _bucket(n), _bucket(N),
            SOFTMAX=softmax, PRECISION=precision, BLOCK_D=block_d, **extra,
        )

    out_h = None
    if q_h is not None:
        out_h = torch.empty_like(q_h, memory_format=torch.contiguous_format)
        if B * H * N:
            kernel = _kernel("hist")
            extra = _interp_blocks(N, N) if interp else {}
            grid = lambda meta: (B * H * triton.cdiv(N, meta["BLOCK_M"]),)  # noqa: E731
            kernel[grid](
                q_h, k_h, v_h, hl, out_h,
                *q_h.stride(), *k_h.stride(), *v_h.stride(), *out_h.stride(),
                H, N, d, scale, _bucket(N),
                SOFTMAX=softmax, PRECISION=precision, BLOCK_D=block_d, **extra,
            )
    return out_c, out_h
