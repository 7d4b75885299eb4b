"""Training-time augmentation: speed perturbation (on samples) and SpecAugment (on features)."""
from __future__ import annotations

import numpy as np
import torch

from .audio import SAMPLE_RATE, resample


def speed_perturb(samples: np.ndarray, factor: float) -> np.ndarray:
    """Play ``factor`` times faster (tempo and pitch, as Kaldi's speed perturbation): resample and reinterpret."""
    if factor == 1.0:
        return samples
    return resample(samples, int(round(SAMPLE_RATE * factor)), SAMPLE_RATE)


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, *, freq_masks: int = 2, freq_width: int = 27,
                 time_masks: int = 10, time_width_ratio: float = 0.05,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """SpecAugment (Park et al. 2019), LibriSpeech 'LD' policy with adaptive time masks.

    features (B, T, F), lengths (B,) -> masked copy, on the features' device. Each utterance gets its own
    masks inside its own length: ``freq_masks`` bands of 0..freq_width bins and ``time_masks`` spans of
    0..time_width_ratio x length frames; masked cells take the utterance's mean (for Whisper-style features,
    near silence). Vectorised (no per-utterance Python loop), so it costs nothing next to a GPU step.
    """
    b, t, n_freq = features.shape
    device = features.device
    lengths = lengths.to(device)

    def uniform(shape, high):  # integers in [0, high] (high broadcast over shape)
        return (torch.rand(shape, generator=generator, device="cpu").to(device) * (high + 1)).floor().long()

    frame_ok = torch.arange(t, device=device)[None, :] < lengths[:, None]  # (B, T)
    mask = torch.zeros(b, t, n_freq, dtype=torch.bool, device=device)
    if freq_masks > 0:
        width = uniform((b, freq_masks), min(freq_width, n_freq))
        start = uniform((b, freq_masks), torch.tensor(n_freq, device=device) - width)
        bins = torch.arange(n_freq, device=device)[None, None, :]
        band = ((bins >= start[..., None]) & (bins < (start + width)[..., None])).any(dim=1)  # (B, F)
        mask |= band[:, None, :] & frame_ok[..., None]
    if time_masks > 0:
        max_width = (time_width_ratio * lengths).long().clamp(min=1)[:, None]  # (B, 1)
        width = uniform((b, time_masks), max_width.expand(b, time_masks))
        start = uniform((b, time_masks), (lengths[:, None] - width).clamp(min=0))
        frames = torch.arange(t, device=device)[None, None, :]
        span = ((frames >= start[..., None]) & (frames < (start + width)[..., None])).any(dim=1)  # (B, T)
        mask |= (span & frame_ok)[..., None]
    total = (features * frame_ok[..., None]).sum(dim=(1, 2))
    mean = total / (lengths.clamp(min=1) * n_freq)
    return torch.where(mask, mean[:, None, None].to(features.dtype), features)
