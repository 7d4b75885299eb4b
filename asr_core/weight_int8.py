"""Weight-only int8, per output channel: the one quantizer both checkpoints and the compression package use.

scale = max|w| / 127 per output channel, rounded to fp16 when computed (so it is stored in half the bytes and a
loaded tensor is bit-identical to the in-memory one); codes in [-127, 127], symmetric, so zero stays zero.
Quantizing an already-rounded tensor again gives the same codes and scales: a checkpoint can be re-saved
(averaged, trained further with that part frozen) without rounding twice.
"""
from __future__ import annotations

import torch

EPS = 1e-6  # smallest scale: fp16 keeps it (a channel of zeros quantizes to codes 0 either way)


def fp16_exact(scales: torch.Tensor) -> torch.Tensor:
    return scales.clamp_min(EPS).half().float()


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, ...) -> int8 codes of the same shape, fp32 scales (out,). Rows are everything after dim 0."""
    rows = w.reshape(w.shape[0], -1).float()
    scales = fp16_exact(rows.abs().amax(dim=1) / 127.0)
    codes = torch.round(rows / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(w.shape), scales


def int8_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (codes.reshape(codes.shape[0], -1).float() * scales.float()[:, None]).reshape(codes.shape)
