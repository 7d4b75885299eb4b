"""Weight quantizers as functions (codes, scales) and as straight-through parametrizations for QAT.

Every quantizer is symmetric, so a pruned zero stays exactly zero. Scales are rounded to fp16 when they are
computed, so the artifact stores them in half the bytes and the loaded model is bit-identical to the in-memory one.

- int8: per output channel, scale = max|w| / 127 (what torch's per-channel int8 kernels take).
- int4: per group of ``group`` consecutive input weights in each row, scale = max|w| / 7, codes in [-8, 7].
- ternary: Li & Liu 2016 (TWN) per output channel: threshold Δ = 0.7·mean|w|, α = mean of |w| above Δ,
  codes in {-1, 0, +1}.
"""
from __future__ import annotations

import torch
from torch import nn

# int8 lives in asr_core because checkpoints store their frozen Whisper part with it too (asr_core.weight_int8)
from asr_core.weight_int8 import EPS, int8_dequantize, int8_quantize  # noqa: F401
from asr_core.weight_int8 import fp16_exact as _fp16_exact


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    out, inp = w.shape
    pad = (-inp) % group
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, -1, group)


def int4_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> int8 codes in [-8, 7] (out, in), fp32 scales (out, ceil(in / group))."""
    g = _grouped(w, group)
    scales = _fp16_exact(g.abs().amax(dim=2) / 7.0)
    codes = torch.round(g / scales[..., None]).clamp(-8, 7)
    return codes.reshape(w.shape[0], -1)[:, : w.shape[1]].to(torch.int8), scales


def int4_dequantize(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    out, inp = codes.shape
    g = _grouped(codes.float(), group) * scales[..., None]
    return g.reshape(out, -1)[:, :inp]


def ternary_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> codes in {-1, 0, 1} (int8), alpha (out,)."""
    delta = 0.7 * w.abs().mean(dim=1, keepdim=True)
    keep = w.abs() > delta
    alpha = (w.abs() * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)
    codes = (torch.sign(w) * keep).to(torch.int8)
    return codes, _fp16_exact(alpha)


def ternary_dequantize(codes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return codes.float() * alpha[:, None]


def fake_quantize(w: torch.Tensor, kind: str, group: int = 64) -> torch.Tensor:
    if kind == "int8":
        return int8_dequantize(*int8_quantize(w))
    if kind == "int4":
        return int4_dequantize(*int4_quantize(w, group), group)
    if kind == "ternary":
        return ternary_dequantize(*ternary_quantize(w))
    raise ValueError(kind)


class FakeQuant(nn.Module):
    """Parametrization: forward uses quantized weights, gradients pass straight through to the latent ones."""

    def __init__(self, kind: str, group: int = 64):
        super().__init__()
        self.kind, self.group = kind, group

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """w: (out, ...) -- convolution kernels are quantized as (out, in x kernel)."""
        q = fake_quantize(w.detach().reshape(w.shape[0], -1), self.kind, self.group).reshape(w.shape)
        return w + (q - w).detach()


def quantized_int8_linear(linear: nn.Linear, codes: torch.Tensor | None = None,
                          scales: torch.Tensor | None = None) -> nn.Module:
    """A Linear running on torch's int8 kernels (fbgemm/x86: dynamic per-tensor activation quantization,
    per-channel int8 weights). Uses the given codes/scales, else quantizes ``linear.weight`` with
    :func:`int8_quantize`, so the weights are exactly those the artifact stores.

    Why torch.ao's dynamic Linear and not torchao: on this 2-core CPU it measured faster (README, Results).
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

    if codes is None:
        codes, scales = int8_quantize(linear.weight.detach().float())
    qweight = torch._make_per_channel_quantized_tensor(
        codes.to(torch.int8), scales.double(), torch.zeros(codes.shape[0], dtype=torch.long), 0)
    module = DynamicQuantLinear(linear.in_features, linear.out_features, bias_=linear.bias is not None,
                                dtype=torch.qint8)
    module.set_weight_bias(qweight, None if linear.bias is None else linear.bias.detach().float())
    return module
