"""Post-training dynamic int8 quantization of a fitted model's linear layers, for CPU serving.

The paper (Hong et al., arXiv 2511.21095) serves GESR with FP8 weights on GPUs. CPU PyTorch has
no FP8 matrix kernels; its counterpart is dynamic int8 quantization
(`torch.ao.quantization.quantize_dynamic`): each chosen `nn.Linear` keeps its weights as int8
(one scale per output row), and every call quantizes its input to uint8 on the fly (scale from
the input's own min and max), multiplies in int8 with int32 accumulation (fbgemm / x86) and
returns float32. Nothing is retrained or calibrated, and the rest of the model stays float32.

A learned stage serves its model quantized when its config says `quantize = "int8"` (a serving
field: `LearnedStage.fit` loads or trains the float32 checkpoint as usual and quantizes after
`prepare_serving`'s float work, so a quantized model is never saved). The kernels are CPU-only:
on another device the stage refuses the setting with an error naming it, before training, rather
than serving float32 under an int8 label.

Which layers: an `nn.Linear` is quantized when both its input and output widths are at least
`MIN_FEATURES` (32). Smaller ones get slower: quantizing the input costs a min/max pass and a
rounding pass over it, which a tiny product does not win back. One thread, 2-core AMD EPYC
(int8 over float32 time, 16,384 rows): 16 -> 16 2.8x slower, 32 -> 16 1.8x slower, 64 -> 16
1.05x slower, 192 -> 1 1.2x slower; 32 -> 64 1.8x faster, 64 -> 64 2.6x, 128 -> 128 3.8x,
320 -> 128 4.6x. At 256 rows (once per request) every width up to 64 is slower and the
largest gain is 3.7x (320 -> 128); those calls take microseconds either way. (Timed with
per-tensor weight scales; per-row scales, used here, timed alike from 32 -> 64 to 320 -> 128.)
A stage also names layers that stay float32 (`LearnedStage.float_linears`, shell-style
patterns): those whose weights its serving path reads as tensors (a quantized layer has no
`.weight` tensor, only packed parameters: GESR's `nro.out` and `hma.mlp.0`, the LSR's `head`),
and those whose int8 error outweighs their time. The LSR's encoder output projections
(`encoder.layers.*.proj`) are those: on ml-100k (256 requests x 60 candidates, one thread), each
layer quantized alone, they gave mean |diff| 0.068 and 0.041 of the score spread, no other layer
more than 0.023; every layer int8 but these two 0.034 instead of 0.086, top-10 overlap with the
float32 ranking 0.978 instead of 0.963, for 35.5 instead of 34.1 ms per batch (float32 42.3,
one A/B run; a second, on a busier machine, timed both at about 53 ms against 62).

Dynamic quantization takes the input's scale from the whole call's input, so a score also
depends, at the level of int8 rounding, on what else the call scores: int8 scores are not
exactly candidate-independent (the stages' `candidate_independent` holds for float32 only). The
tests' LSR: a candidate's score moved by up to 0.14 (6% of the score spread) scored with 3
instead of 40 candidates. GESR's int8 layers run per request and per item, so its scores do not
depend on the other candidates, only (through the towers) on the other requests of the call.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from fnmatch import fnmatchcase

import torch
from torch import nn

QUANTIZE_MODES: tuple[str, ...] = ("none", "int8")
MIN_FEATURES = 32  # see the module docstring for the measurement behind it

# the warnings torch 2.13 emits for torch.ao.quantization (deprecated in favour of torchao,
# which the project does not depend on) and for the quantized tensors it creates
_SILENCED = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel .* are deprecated"),
)


def check_mode(mode: object, field: str) -> None:
    """A config's `quantize` value: one of `QUANTIZE_MODES`, else ValueError naming `field`."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"{field} must be one of {list(QUANTIZE_MODES)}, got {mode!r}")


def check_device(mode: str, device: torch.device | str, field: str) -> None:
    """int8 serving on a non-CPU device: ValueError naming `field` (checked before training)."""
    if mode == "int8" and torch.device(device).type != "cpu":
        raise ValueError(
            f"{field} = 'int8' serves on CPU only (torch's dynamic int8 Linear kernels are "
            f"CPU kernels), but the model is on {torch.device(device)}; set {field} = 'none' "
            "on this device"
        )


def quantizable(model: nn.Module, *, skip: Collection[str] = (),
                min_features: int = MIN_FEATURES) -> list[str]:
    """Names of the `nn.Linear` layers of `model` that `quantize_linears` would quantize."""
    return [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and not any(fnmatchcase(name, p) for p in skip)
        and min(m.in_features, m.out_features) >= min_features
    ]


def is_quantized(module: nn.Module) -> bool:
    """A dynamic int8 Linear (what `quantize_linears` puts in place of an `nn.Linear`)."""
    return isinstance(module, torch.ao.nn.quantized.dynamic.Linear)


def quantize_linears(
    model: nn.Module,
    *,
    skip: Collection[str] = (),
    min_features: int = MIN_FEATURES,
    field: str = "quantize",
) -> list[str]:
    """Replace, in place, the `nn.Linear` layers of `model` (eval mode) at least `min_features`
    wide on both sides and not matched by `skip` (qualified names or shell-style patterns:
    "hma.mlp.0", "encoder.layers.*.proj") by dynamic int8
    Linear layers with per-output-row weight scales. Returns their names.

    ValueError (naming `field`) when `model` is not on the CPU or when no layer qualifies: an
    int8 setting that changes nothing is reported, not served as float32."""
    check_device("int8", next(model.parameters()).device, field)
    names = quantizable(model, skip=skip, min_features=min_features)
    if not names:
        raise ValueError(
            f"{field} = 'int8': no nn.Linear layer of {type(model).__name__} is at least "
            f"{min_features} wide on both sides (narrower ones get slower quantized), so nothing "
            f"would be quantized; set {field} = 'none'"
        )
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        for category, message in _SILENCED:
            warnings.filterwarnings("ignore", message=message, category=category)
        torch.ao.quantization.quantize_dynamic(
            model, {name: qconfig for name in names}, dtype=torch.qint8, inplace=True
        )
    return names
