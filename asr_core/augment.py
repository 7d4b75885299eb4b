"""Training-time augmentation: speed perturbation (on samples) and SpecAugment (on features)."""
from __future__ import annotations

import random

import numpy as np
import torch

from .audio import SAMPLE_RATE, resample


def speed_perturb(samples: np.ndarray, factor: float) -> np.ndarray:
    """Play ``factor`` times faster (tempo and pitch, as Kaldi's speed perturbation): resample and reinterpret."""
    if factor == 1.0:
        return samples
    return resample(samples, int(round(SAMPLE_RATE * factor)), SAMPLE_RATE)


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, *, freq_masks: int = 2, freq_width: int = 27,
                 time_masks: int = 10, time_width_ratio: float = 0.05, rng: random.Random | None = None,
                 fill: float | None = None) -> torch.Tensor:
    """SpecAugment (Park et al. 2019), LibriSpeech 'LD' policy with adaptive time masks.

    features (B, T, F) -> masked copy; each utterance gets its own masks inside its own length. Masked cells
    take ``fill`` (default: the utterance mean, which for Whisper-style features is near silence).
    """
    rng = rng or random
    out = features.clone()
    n_freq = features.shape[2]
    for b, length in enumerate(lengths.tolist()):
        value = out[b, :length].mean() if fill is None else fill
        for _ in range(freq_masks):
            width = rng.randint(0, min(freq_width, n_freq))
            start = rng.randint(0, n_freq - width)
            out[b, :length, start:start + width] = value
        max_width = max(1, int(time_width_ratio * length))
        for _ in range(time_masks):
            width = rng.randint(0, max_width)
            start = rng.randint(0, max(0, length - width))
            out[b, start:start + width, :] = value
    return out
