"""Weight quantizers as functions (codes, scales) and as straight-through parametrizations for QAT.

Every quantizer is symmetric, so a pruned zero stays exactly zero. Scales are rounded to fp16 when they are
computed, so the artifact stores them in half the bytes and the loaded model is bit-identical to the in-memory one.

- int8: per output channel, scale = max|w| / 127 (what torch's per-channel int8 kernels take).
- int4: per group of ``group`` consecutive input weights in each row, scale = max|w| / 7, codes in [-8, 7].
- ternary: Li & Liu 2016 (TWN) per output channel (or per group of inputs): threshold Δ = 0.7·mean|w|,
  α = mean of |w| above Δ, codes in {-1, 0, +1}.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

# int8 lives in asr_core because checkpoints store their frozen Whisper part with it too (asr_core.weight_int8)
from asr_core.weight_int8 import EPS, int8_dequantize, int8_quantize  # noqa: F401
from asr_core.weight_int8 import fp16_exact as _fp16_exact


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    out, inp = w.shape
    pad = (-inp) % group
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, -1, group)


def int4_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> int8 codes in [-8, 7] (out, in), fp32 scales (out, ceil(in / group))."""
    g = grouped(w, group)
    scales = _fp16_exact(g.abs().amax(dim=2) / 7.0)
    codes = torch.round(g / scales[..., None]).clamp(-8, 7)
    return codes.reshape(w.shape[0], -1)[:, : w.shape[1]].to(torch.int8), scales


def int4_dequantize(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    out, inp = codes.shape
    g = grouped(codes.float(), group) * scales[..., None]
    return g.reshape(out, -1)[:, :inp]


def ternary_quantize(w: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> codes in {-1, 0, 1} (int8), alpha (out,) -- or (out, ceil(in / group)) per group of inputs."""
    g = grouped(w, group) if group else w[:, None, :]  # (out, groups, size); padding zeros do not count
    counted = torch.ones_like(g, dtype=torch.bool) if not group else grouped(torch.ones_like(w), group).bool()
    delta = 0.7 * (g.abs() * counted).sum(2, keepdim=True) / counted.sum(2, keepdim=True).clamp_min(1)
    keep = (g.abs() > delta) & counted
    alpha = (g.abs() * keep).sum(2) / keep.sum(2).clamp_min(1)
    codes = (torch.sign(g) * keep).reshape(w.shape[0], -1)[:, : w.shape[1]].to(torch.int8)
    alpha = _fp16_exact(alpha)
    return codes, alpha if group else alpha[:, 0]


def ternary_dequantize(codes: torch.Tensor, alpha: torch.Tensor, group: int | None = None) -> torch.Tensor:
    if not group:
        return codes.float() * alpha[:, None]
    return int4_dequantize(codes, alpha, group)  # the same grouped scaling, on codes in {-1, 0, 1}


def fake_quantize(w: torch.Tensor, kind: str, group: int | None = 64) -> torch.Tensor:
    """Round-to-nearest: int8 per row; int4 per ``group``; ternary per ``group``, or per row when None."""
    if kind == "int8":
        return int8_dequantize(*int8_quantize(w))
    if kind == "int4":
        return int4_dequantize(*int4_quantize(w, group), group)
    if kind == "ternary":
        return ternary_dequantize(*ternary_quantize(w, group), group)
    raise ValueError(kind)


GRID = {"int8": (-127, 127), "int4": (-8, 7), "ternary": (-1, 1)}  # integer codes each kind stores


def element_scales(scales: torch.Tensor, kind: str, group: int | None, width: int) -> torch.Tensor:
    """Stored scales -- (out,) per row, or (out, groups) for int4 and grouped ternary -- as one per weight
    (out, width)."""
    if scales.dim() == 2:
        return scales.repeat_interleave(group, dim=1)[:, :width]
    return scales[:, None].expand(-1, width)


def round_with_scales(w: torch.Tensor, scales: torch.Tensor, kind: str, group: int = 64) -> torch.Tensor:
    """(out, in) -> integer codes (int8) on ``kind``'s grid with the given stored scales."""
    low, high = GRID[kind]
    return torch.round(w / element_scales(scales, kind, group, w.shape[1])).clamp(low, high).to(torch.int8)


class FakeQuant(nn.Module):
    """Parametrization: forward uses quantized weights, gradients pass straight through to the latent ones.

    ``scales`` None: round-to-nearest, scales recomputed from the weights at every call (the data-free
    quantizers above). Given (a calibrated algorithm chose them, e.g. GPTQ's clipped group scales): fixed, and
    the weights round to that grid; a GPTQ result, already on it, is reproduced exactly.
    """

    def __init__(self, kind: str, group: int = 64, scales: torch.Tensor | None = None, full_range: bool = False):
        super().__init__()
        self.kind, self.group = kind, group
        self.full_range = full_range  # int8 run on torch's kernels: 8-bit activations where safe
        self.register_buffer("scales", None if scales is None else _fp16_exact(scales.float()))

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, in x kernel) -> (int8 codes, scales) as the artifact stores them."""
        if self.scales is None:
            if self.kind == "int8":
                return int8_quantize(w)
            return (int4_quantize if self.kind == "int4" else ternary_quantize)(w, self.group)
        return round_with_scales(w, self.scales, self.kind, self.group), self.scales

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """w: (out, ...) -- convolution kernels are quantized as (out, in x kernel)."""
        rows = w.detach().reshape(w.shape[0], -1)
        if self.scales is None:
            q = fake_quantize(rows, self.kind, self.group)
        else:
            q = round_with_scales(rows, self.scales, self.kind, self.group).float() * \
                element_scales(self.scales, self.kind, self.group, rows.shape[1])
        return w + (q.reshape(w.shape) - w).detach()


@functools.lru_cache(maxsize=1)
def full_range_int8_is_safe() -> bool:
    """Whether this CPU multiplies u8 x s8 with 32-bit accumulation (AVX-512 VNNI, AVX-VNNI or AMX).

    torch's dynamic int8 Linear quantizes activations to 7 bits (``reduce_range=True``) because fbgemm's
    AVX2 kernel sums pairs of u8 x s8 products in int16, which saturates at full range. With VNNI the sum is
    32-bit and the eighth bit is free: measured on the shipped baseline, it halves each layer's activation
    rounding error. Elsewhere (or off Linux, where the flags are not read) the 7-bit range stays.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantized_int8_linear(linear: nn.Linear, codes: torch.Tensor | None = None,
                          scales: torch.Tensor | None = None, full_range: bool = False) -> nn.Module:
    """A Linear running on torch's int8 kernels (fbgemm/x86: dynamic per-tensor activation quantization,
    per-channel int8 weights). Uses the given codes/scales, else quantizes ``linear.weight`` with
    :func:`int8_quantize`, so the weights are exactly those the artifact stores. ``full_range``: 8-bit
    activations where :func:`full_range_int8_is_safe` (else torch's 7-bit default).

    Why torch.ao's dynamic Linear and not torchao: on this 2-core CPU it measured faster (docs/HISTORY.md).
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

    if codes is None:
        codes, scales = int8_quantize(linear.weight.detach().float())
    qweight = torch._make_per_channel_quantized_tensor(
        codes.to(torch.int8), scales.double(), torch.zeros(codes.shape[0], dtype=torch.long), 0)
    cls = _full_range_linear() if full_range and full_range_int8_is_safe() else DynamicQuantLinear
    module = cls(linear.in_features, linear.out_features, bias_=linear.bias is not None, dtype=torch.qint8)
    module.set_weight_bias(qweight, None if linear.bias is None else linear.bias.detach().float())
    return module


@functools.lru_cache(maxsize=1)
def _full_range_linear():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

    class FullRangeDynamicLinear(DynamicQuantLinear):
        """torch's dynamic int8 Linear with 8-bit (not 7-bit) activations: only built where VNNI makes it safe."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                      reduce_range=False).to(x.dtype)

        def _get_name(self):
            return "DynamicQuantizedLinear8"

    return FullRangeDynamicLinear
