"""Bit packing: n codes of b bits each stored in ceil(n * b / 8) bytes (numpy's packbits does the bytes)."""
from __future__ import annotations

import math

import numpy as np
import torch


def bits_for(levels: int) -> int:
    """Bits needed to index ``levels`` values: ceil(log2(levels)), at least 1."""
    return max(1, math.ceil(math.log2(levels)))


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2**bits) of any shape -> uint8 tensor of packed_nbytes(numel, bits) bytes."""
    flat = codes.reshape(-1).to(torch.int64).cpu().numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) to pack at {bits} bits")
    if bits == 8:
        return torch.from_numpy(flat.astype(np.uint8))
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bitplanes = ((flat[:, None] >> shifts[None, :]) & 1).astype(np.uint8)  # (n, bits), most significant first
    return torch.from_numpy(np.packbits(bitplanes.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes, as int64 of shape (n,)."""
    data = packed.cpu().numpy().astype(np.uint8)
    if bits == 8:
        return torch.from_numpy(data[:n].astype(np.int64))
    planes = np.unpackbits(data)[: n * bits].reshape(n, bits).astype(np.int64)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return torch.from_numpy(planes @ weights)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> 1 bit per entry."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.cpu().numpy())[:n].astype(bool)).reshape(shape)
