"""Every hyper-parameter of the front-end and the model, in dataclasses that travel inside each checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import SettingsError


@dataclass
class FeatureConfig:
    """Log-mel front-end. The defaults are Whisper's, so a Whisper-initialised encoder hears what it knows."""

    sample_rate: int = 16000
    n_fft: int = 400  # 25 ms window
    hop_length: int = 160  # 10 ms hop: 100 frames per second
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = None  # None: Nyquist
    mel_scale: str = "slaney"  # "slaney" (Whisper, librosa default) or "htk"
    # "whisper": log10, floor at max-8, (x+4)/4 per utterance; "meanvar": ln then per-utterance mean/var;
    # "none": plain natural log.
    normalize: str = "whisper"


@dataclass
class ModelConfig:
    """A Conformer-CTC (Gulati et al. 2020) and its front-end.

    Block: x += ½·FFN(x); x += MHSA(x); x += Conv(x); x += ½·FFN(x); x = LayerNorm(x) (``block_final_norm``).
    """

    vocab_size: int = 29
    d_model: int = 144
    n_layers: int = 4
    n_heads: int = 4
    attn_dim: int | None = None  # width of q/k/v (n_heads x head size); None: d_model. Structured pruning shrinks it.
    ffn_dim: int = 576
    conv_kernel: int = 15
    dropout: float = 0.1
    # "conv2d": two 3x3 stride-2 Conv2d (4x, 40 ms frames; Conformer paper);
    # "whisper": Conv1d k3 s1 + Conv1d k3 s2 with GELU (2x, 20 ms frames; Whisper's stem).
    subsampling: str = "conv2d"
    subsampling_channels: int = 144
    ffn_activation: str = "swish"  # "swish" (Conformer) or "gelu" (Whisper)
    # Whisper-initialised encoders keep Whisper's pre-norm residual stream: no LayerNorm closing each block,
    # one LayerNorm after the last block instead (Whisper's ln_post).
    block_final_norm: bool = True
    final_norm: bool = False
    # The first N blocks are plain Transformer blocks, Whisper's shape: x += MHSA(x); x += ½·FFN(x) (ffn2), no
    # half-step ffn1 and no convolution module. Set by `train --freeze-layers` on a Whisper warm start, where those
    # modules would stay identity forever (zero output projections, never trained): in the shipped model they cost
    # 13 MB and a quarter of the greedy run time (RTF 0.020 with them, 0.015 without) for nothing. See
    # asr_core.model.drop_identity_modules.
    transformer_layers: int = 0
    # Storage, not shape: the matrices of the conv stem and of the first N blocks are stored as weight-only int8
    # per output channel (asr_core.weight_int8) and load dequantized. Set by `train --int8-frozen` for the frozen
    # Whisper part, which it rounds once before training so that the new blocks learn on exactly the values
    # that ship: Whisper base's frozen encoder takes 20 MB instead of 40 MB (fp16), for the ~60 MB folder budget.
    int8_stored_layers: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self):
        if isinstance(self.features, dict):
            self.features = FeatureConfig(**self.features)
        if self.n_heads < 1 or self.inner_attn_dim % self.n_heads:
            raise SettingsError(f"attention width {self.inner_attn_dim} must be divisible by n_heads={self.n_heads}.")
        if self.subsampling not in ("conv2d", "whisper"):
            raise SettingsError(f"Unknown subsampling {self.subsampling!r}; use 'conv2d' or 'whisper'.")
        if not 0 <= self.transformer_layers <= self.n_layers:
            raise SettingsError(f"transformer_layers must be between 0 and n_layers={self.n_layers}, "
                                f"got {self.transformer_layers}.")
        if not 0 <= self.int8_stored_layers <= self.n_layers:
            raise SettingsError(f"int8_stored_layers must be between 0 and n_layers={self.n_layers}, "
                                f"got {self.int8_stored_layers}.")
        if self.ffn_activation not in ("swish", "gelu"):
            raise SettingsError(f"Unknown ffn_activation {self.ffn_activation!r}; use 'swish' or 'gelu'.")

    @property
    def inner_attn_dim(self) -> int:
        return self.attn_dim or self.d_model

    @property
    def subsampling_factor(self) -> int:
        return 4 if self.subsampling == "conv2d" else 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise SettingsError(f"Unknown model config keys: {sorted(unknown)}")
        return cls(**values)


# Size presets. Parameter counts (29-character vocabulary) are printed by `edge-asr train`:
# xs ≈ 2 M, s ≈ 10 M, m ≈ 30 M; whisper-tiny ≈ 12 M and whisper-base ≈ 30 M (Conformer modules added to
# Whisper's encoder layers).
PRESETS: dict[str, dict] = {
    "xs": dict(d_model=144, n_layers=4, n_heads=4, ffn_dim=576, conv_kernel=15, subsampling_channels=144),
    "s": dict(d_model=256, n_layers=6, n_heads=4, ffn_dim=1024, conv_kernel=31, subsampling_channels=256),
    "m": dict(d_model=384, n_layers=8, n_heads=6, ffn_dim=1536, conv_kernel=31, subsampling_channels=384),
    "whisper-tiny": dict(
        d_model=384, n_layers=4, n_heads=6, ffn_dim=1536, conv_kernel=15, subsampling="whisper",
        subsampling_channels=384, ffn_activation="gelu", block_final_norm=False, final_norm=True,
    ),
    "whisper-base": dict(
        d_model=512, n_layers=6, n_heads=8, ffn_dim=2048, conv_kernel=15, subsampling="whisper",
        subsampling_channels=512, ffn_activation="gelu", block_final_norm=False, final_norm=True,
    ),
    # A few-hundred-thousand-parameter model for tests and smoke runs.
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, ffn_dim=128, conv_kernel=7, subsampling_channels=32),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise SettingsError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return ModelConfig(**{**PRESETS[name], **overrides})
