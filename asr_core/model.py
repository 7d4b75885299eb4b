"""Conformer-CTC (Gulati et al. 2020, "Conformer: Convolution-augmented Transformer for Speech Recognition").

Shapes: B batch, T feature frames (100 per second), T' = encoder frames after subsampling, F mel bins,
D model width, V vocabulary. Every matrix product is an ``nn.Linear`` (the convolution module's pointwise
convolutions too), so the compression package has one kind of layer to transform.

The forward pass has no Python-side data-dependent control flow: padding is handled with masks built from
``lengths`` by tensor ops, so ``torch.export`` can trace it.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def subsampled_lengths(lengths: torch.Tensor, n_stride2: int) -> torch.Tensor:
    """Each stride-2, kernel-3, padding-1 convolution maps L frames to floor((L - 1) / 2) + 1."""
    for _ in range(n_stride2):
        lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
    return lengths


def sinusoids(length: int, channels: int, device=None, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions, (length, channels) = [sin | cos]; computed for any length, so no 1500 cap."""
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2, device=device, dtype=torch.float32))
    scaled = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class _Conv2dSubsampling(nn.Module):
    """Two 3x3 stride-2 Conv2d + ReLU, then a Linear to D: (B, T, F) -> (B, ceil-ish(T/4), D)."""

    n_stride2 = 2

    def __init__(self, n_mels: int, channels: int, d_model: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        freq = (n_mels - 1) // 2 + 1
        freq = (freq - 1) // 2 + 1
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)  # (B, 1, T, F)
        x = F.relu(self.conv1(x))
        # zero what lies past each utterance so the next convolution sees what it would see unpadded
        x = x * valid_mask(subsampled_lengths(lengths, 1), x.shape[2])[:, None, :, None]
        x = F.relu(self.conv2(x))  # (B, C, T', F')
        b, c, t, f = x.shape
        return self.out(x.permute(0, 2, 1, 3).reshape(b, t, c * f))


class _WhisperSubsampling(nn.Module):
    """Whisper's stem: Conv1d(F, C, 3) + GELU, Conv1d(C, D, 3, stride 2) + GELU: (B, T, F) -> (B, T', D)."""

    n_stride2 = 1

    def __init__(self, n_mels: int, channels: int, d_model: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, channels, 3, padding=1)
        self.conv2 = nn.Conv1d(channels, d_model, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x.transpose(1, 2)))  # (B, C, T)
        x = x * valid_mask(lengths, x.shape[2])[:, None, :]
        return F.gelu(self.conv2(x)).transpose(1, 2)


class _FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float, activation: str):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.activation = nn.SiLU() if activation == "swish" else nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear2(self.dropout(self.activation(self.linear1(self.norm(x))))))


def key_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) True on real frames -> (B, T) additive attention bias: 0 on real keys, dtype's lowest on padding.

    The same attention weights as a boolean mask (the padded keys' exp underflows to exactly 0), but a float
    mask exports to ONNX as one Add: a boolean one also brings a NaN guard (IsNaN + Where) over every (T, T)
    score matrix, about 7% of ONNX Runtime's time on the shipped model. A finite lowest value keeps a row with
    no real key (a zero-length item in a batch) finite instead of NaN.
    """
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~key_mask, torch.finfo(dtype).min)


class _SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a key padding mask."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, attn_dim: int | None = None):
        super().__init__()
        attn_dim = attn_dim or d_model
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, attn_dim)
        self.k_proj = nn.Linear(d_model, attn_dim)
        self.v_proj = nn.Linear(d_model, attn_dim)
        self.out_proj = nn.Linear(attn_dim, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D); key_mask: (B, T) True on real frames -> (B, T, D)."""
        b, t = x.shape[0], x.shape[1]
        h = self.norm(x)

        def heads(proj: nn.Module) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return proj(h).view(b, t, self.n_heads, -1).transpose(1, 2)

        attn = F.scaled_dot_product_attention(
            heads(self.q_proj), heads(self.k_proj), heads(self.v_proj),
            attn_mask=key_bias(key_mask, h.dtype)[:, None, None, :], dropout_p=self.dropout if self.training else 0.0,
        )
        out = self.out_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return F.dropout(out, self.dropout, self.training)


class _ConvModule(nn.Module):
    """Pointwise (D -> 2D) + GLU, depthwise Conv1d, LayerNorm, Swish, pointwise (D -> D), dropout.

    LayerNorm rather than the paper's BatchNorm: it keeps padded and unpadded batches identical in training
    too, and it does not need running statistics that a 5-hour data set estimates poorly.
    """

    def __init__(self, d_model: int, kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pointwise1 = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.conv_norm = nn.LayerNorm(d_model)
        self.pointwise2 = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D); frame_mask: (B, T) -> (B, T, D)."""
        h = F.glu(self.pointwise1(self.norm(x)), dim=-1)
        h = h * frame_mask[..., None]  # padded frames must not leak into real ones through the kernel
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        return self.dropout(self.pointwise2(F.silu(self.conv_norm(h))))


class ConformerBlock(nn.Module):
    """x += ½·ffn1(x); x += attn(x); x += conv(x); x += ½·ffn2(x); final_norm. With ``transformer=True`` there
    is no ffn1 and no conv (``None``): a plain pre-norm Transformer block, Whisper's shape."""

    def __init__(self, cfg: ModelConfig, transformer: bool = False):
        super().__init__()
        self.ffn1 = None if transformer else _FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout, cfg.ffn_activation)
        self.attn = _SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.attn_dim)
        self.conv = None if transformer else _ConvModule(cfg.d_model, cfg.conv_kernel, cfg.dropout)
        self.ffn2 = _FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout, cfg.ffn_activation)
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.block_final_norm else nn.Identity()

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        if self.ffn1 is not None:  # fixed per block at construction: no data-dependent control flow
            x = x + 0.5 * self.ffn1(x)
        x = x + self.attn(x, frame_mask)
        if self.conv is not None:
            x = x + self.conv(x, frame_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


class ConformerCTC(nn.Module):
    """Log-mel features in, CTC log-probabilities out.

    Example:
        >>> model = ConformerCTC(preset("tiny"))
        >>> log_probs, out_lengths = model(torch.zeros(2, 300, 80), torch.tensor([300, 200]))
        >>> log_probs.shape, out_lengths.tolist()
        (torch.Size([2, 75, 29]), [75, 50])
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        stem = _Conv2dSubsampling if cfg.subsampling == "conv2d" else _WhisperSubsampling
        self.subsampling = stem(cfg.features.n_mels, cfg.subsampling_channels, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(ConformerBlock(cfg, transformer=i < cfg.transformer_layers)
                                    for i in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return subsampled_lengths(lengths, self.subsampling.n_stride2)

    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, F), lengths (B,) -> encoder output (B, T', D), output lengths (B,)."""
        features = features * valid_mask(lengths, features.shape[1])[..., None]
        x = self.subsampling(features, lengths)
        out_lengths = self.output_lengths(lengths)
        x = self.dropout(x + sinusoids(x.shape[1], x.shape[2], device=x.device).to(x.dtype))
        frame_mask = valid_mask(out_lengths, x.shape[1])
        for block in self.blocks:
            x = block(x, frame_mask)
        return self.final_norm(x), out_lengths

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, F), lengths (B,) -> log-probs (B, T', V) in fp32, output lengths (B,)."""
        x, out_lengths = self.encode(features, lengths)
        return F.log_softmax(self.head(x).float(), dim=-1), out_lengths


def _is_zero_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not module.weight.any() and (module.bias is None or not module.bias.any())


def close_blocks(model: "ConformerCTC", first: int) -> int:
    """Zero every residual branch's output projection in blocks ``first``.. so that they start as identity (the
    model computes what it did with ``first`` blocks). Used when ``train --layers`` grows a trained model.
    Returns the number of blocks closed; none when blocks end in a LayerNorm (they cannot be identity)."""
    if model.cfg.block_final_norm:
        return 0
    with torch.no_grad():
        for block in model.blocks[first:]:
            for module in (block.ffn1 and block.ffn1.linear2, block.attn.out_proj,
                           block.conv and block.conv.pointwise2, block.ffn2.linear2):
                if module is not None:
                    module.weight.zero_()
                    module.bias.zero_()
    return max(0, model.cfg.n_layers - first)


def drop_identity_modules(model: ConformerCTC, max_blocks: int) -> int:
    """Turn the leading blocks (at most ``max_blocks``) whose ffn1 and conv module are exact identities (zero
    output projection and bias, as a Whisper warm start leaves them) into plain Transformer blocks, in place.

    The output is bit-identical: those branches add exactly 0 to the residual stream. Meant for blocks that stay
    frozen (``train --freeze-layers``), whose identity modules would otherwise be stored, loaded and computed
    forever for nothing. Stops at the first block that is not such an identity; records the count in
    ``model.cfg.transformer_layers`` (so the saved config rebuilds the same shape) and returns it.
    """
    n = model.cfg.transformer_layers
    for block in model.blocks[n:max_blocks]:
        if not (block.ffn1 is not None and block.conv is not None
                and _is_zero_linear(block.ffn1.linear2) and _is_zero_linear(block.conv.pointwise2)):
            break
        block.ffn1, block.conv = None, None
        n += 1
    model.cfg = dataclasses.replace(model.cfg, transformer_layers=n)
    return n


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
