"""Shared tolerance table for comparing fast paths (Triton, decomposed torch) with references.

Use `torch.testing.assert_close(actual, expected, **tol(dtype))`. fp16/bf16 entries cover inputs
rounded to the low-precision dtype with fp32 accumulation and a low-precision output.
"""

import torch

TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
# gradients go through more operations (and a backward pass), so a looser fp32 bound
GRAD_TOLERANCES = {torch.float32: {"atol": 1e-4, "rtol": 1e-3}}


def tol(dtype: torch.dtype, *, grad: bool = False) -> dict:
    table = GRAD_TOLERANCES if grad else TOLERANCES
    if dtype not in table:
        raise KeyError(f"no tolerance for {dtype}; known: {list(table)}")
    return dict(table[dtype])
