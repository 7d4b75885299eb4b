"""Bit packing: n codes of b bits each stored in ceil(n * b / 8) bytes (numpy's packbits does the masks), and the
lossless Huffman coding of a packed stream."""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch


def bits_for(levels: int) -> int:
    """Bits needed to index ``levels`` values: ceil(log2(levels)), at least 1."""
    return max(1, math.ceil(math.log2(levels)))


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2**bits) of any shape -> uint8 tensor of packed_nbytes(numel, bits) bytes: one
    stream of ``bits``-bit fields, most significant bit first (the layout numpy's packbits gives the bit planes).

    Eight codes fill exactly ``bits`` bytes, so each group of eight is assembled in one int64 and cut into its
    bytes: a few whole-tensor shifts instead of a (n, bits) bit-plane array (a sweep packs every layer anew)."""
    flat = codes.reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) to pack at {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    n = flat.numel()
    groups = torch.nn.functional.pad(flat, (0, -n % 8)).reshape(-1, 8)
    word = torch.zeros(groups.shape[0], dtype=torch.int64)
    for i in range(8):  # 8 x bits <= 56 bits: fits an int64 without touching the sign
        word.bitwise_or_(groups[:, i] << (bits * (7 - i)))
    shifts = torch.arange(8 * (bits - 1), -1, -8, dtype=torch.int64)
    packed = ((word[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_nbytes(n, bits)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes, as int64 of shape (n,)."""
    data = packed.reshape(-1).cpu().to(torch.int64)
    if bits == 8:
        return data[:n].clone()
    groups = math.ceil(n / 8)
    data = torch.nn.functional.pad(data, (0, groups * bits - data.numel())).reshape(groups, bits)
    word = torch.zeros(groups, dtype=torch.int64)
    for j in range(bits):
        word.bitwise_or_(data[:, j] << (8 * (bits - 1 - j)))
    shifts = torch.arange(bits * 7, -1, -bits, dtype=torch.int64)
    return ((word[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:n].clone()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> 1 bit per entry."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.cpu().numpy())[:n].astype(bool)).reshape(shape)


def huffman_encode(data: torch.Tensor) -> torch.Tensor | None:
    """A packed code stream (any 1-byte dtype) -> its bytes Huffman-coded, uint8; None when that saves nothing.

    Code streams are far from uniform (most GPTQ codes and centroid indices sit near the middle of their range),
    so an order-0 Huffman code takes 9-21% off them, losslessly: Deep Compression's last stage. This is the
    Huffman stage of DEFLATE in the standard library (``zlib``, strategy ``Z_HUFFMAN_ONLY``) rather than a coder
    of our own: its C decoder restores a layer in milliseconds. LZ77 matching is off because code streams have
    no repeats to find, and on them it made the output larger than the input."""
    raw = data.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
    coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)  # -15: raw DEFLATE, no header
    coded = coder.compress(raw) + coder.flush()
    if len(coded) >= len(raw):
        return None
    return torch.frombuffer(bytearray(coded), dtype=torch.uint8)


def huffman_decode(coded: torch.Tensor, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of :func:`huffman_encode`: the packed stream of exactly ``nbytes`` bytes as a flat tensor of
    ``dtype`` (1 byte per entry). Raw DEFLATE has no checksum, so the length is what catches a damaged stream
    (and a stream that would decode to more than the layer holds is stopped there, not expanded)."""
    decoder = zlib.decompressobj(-15)
    try:
        raw = decoder.decompress(coded.reshape(-1).numpy().tobytes(), nbytes)
    except zlib.error as err:
        raise ValueError(f"a Huffman-coded tensor is corrupt ({err})") from None
    if len(raw) != nbytes or not decoder.eof or decoder.unused_data:
        raise ValueError(f"a Huffman-coded tensor is corrupt (it does not decode to the {nbytes} bytes expected)")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
