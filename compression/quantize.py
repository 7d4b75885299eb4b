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
import warnings

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

    def __init__(self, kind: str, group: int = 64, scales: torch.Tensor | None = None,
                 activations: str = "reduced"):
        super().__init__()
        self.kind, self.group = kind, group
        self.activations = activations  # int8 only: how the runtime rounds activations (ACTIVATIONS)
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


# How an int8 artifact's runtime rounds its activations: "reduced" (torch's dynamic kernel, one 7-bit scale per
# call), "full" (the same kernel, 8 bits, where the CPU makes it safe), "per-row" (one 8-bit scale per frame,
# PerRowInt8Linear).
ACTIVATIONS = ("reduced", "full", "per-row")


def quantized_int8_linear(linear: nn.Linear, codes: torch.Tensor | None = None,
                          scales: torch.Tensor | None = None, activations: str = "reduced") -> nn.Module:
    """A Linear running on int8 kernels with per-channel int8 weights. Uses the given codes/scales, else quantizes
    ``linear.weight`` with :func:`int8_quantize`, so the weights are exactly those the artifact stores.
    ``activations`` (ACTIVATIONS): "per-row" gives :class:`PerRowInt8Linear` where :func:`int_mm_is_exact`
    (else, with a warning, the per-call kernel); "full" gives 8-bit activations where
    :func:`full_range_int8_is_safe` (else torch's 7-bit default).

    Why torch.ao's dynamic Linear and not torchao: on this 2-core CPU it measured faster (docs/HISTORY.md).
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

    if codes is None:
        codes, scales = int8_quantize(linear.weight.detach().float())
    bias = None if linear.bias is None else linear.bias.detach().float()
    if activations == "per-row":
        if int_mm_is_exact():
            return PerRowInt8Linear(codes, scales, bias)
        warnings.warn("torch._int_mm is not exact on this CPU: int8 runs with one activation scale per call")
        activations = "full"
    qweight = torch._make_per_channel_quantized_tensor(
        codes.to(torch.int8), scales.double(), torch.zeros(codes.shape[0], dtype=torch.long), 0)
    full = activations == "full" and full_range_int8_is_safe()
    cls = _full_range_linear() if full else DynamicQuantLinear
    module = cls(linear.in_features, linear.out_features, bias_=linear.bias is not None, dtype=torch.qint8)
    module.set_weight_bias(qweight, bias)
    return module


class PerRowInt8Linear(nn.Module):
    """int8 weights per output channel x int8 activations per row (one symmetric scale per frame), int32 sums.

    torch's dynamic kernel rounds a whole call's activations with one scale, so one loud frame coarsens every
    other frame's rounding; a scale per row does not (the ONNX export's per-row option measured -0.1% against
    +2.3% relative WER on the 457 held-out utterances, docs/RESULTS.md). Written by hand because torch has no
    such Linear: ``torch._int_mm`` does the int8 x int8 -> int32 product, the scales are applied after it.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.register_buffer("codes_t", codes.to(torch.int8).t().contiguous())  # (in, out): _int_mm's layout
        self.register_buffer("scales", scales.float().clone())  # (out,)
        self.register_buffer("bias", None if bias is None else bias.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        rows = x.reshape(-1, self.in_features).float()
        row_scales = rows.abs().amax(1, keepdim=True).clamp_min(EPS) / 127.0  # (rows, 1)
        out = torch._int_mm(torch.round(rows / row_scales).to(torch.int8), self.codes_t).float()
        out.mul_(row_scales).mul_(self.scales)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """(out, in) float: the weights it multiplies by, for reports and pictures (not used by forward)."""
        return self.codes_t.t().float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations=per-row"


def is_int8_runtime(module: nn.Module) -> bool:
    """Whether ``module`` is one of the int8 Linears an artifact loads into (no float weights to compress)."""
    return isinstance(module, PerRowInt8Linear) or type(module).__module__.startswith("torch.ao")


@functools.lru_cache(maxsize=1)
def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` sums int8 x int8 products exactly here, worst case (every product ±127²,
    where a kernel pairing products in int16 would saturate) and random codes; checked once per process."""
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (8, 512), dtype=torch.int8, generator=generator)
        a[0], a[1] = 127, -127
        b = torch.randint(-127, 128, (512, 24), dtype=torch.int8, generator=generator)
        b[:, 0] = 127
        return torch.equal(torch._int_mm(a, b).double(), a.double() @ b.double())
    except (RuntimeError, AttributeError):  # no such kernel on this build or CPU
        return False


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
