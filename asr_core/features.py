"""Log-mel front-end in torch (torchaudio does not import against the pinned torch, and this is 40 lines).

``log_mel(samples, cfg)`` maps 16 kHz mono samples of shape (n_samples,) to features of shape
(n_frames, n_mels) with n_frames = n_samples // hop_length, exactly as Whisper's ``log_mel_spectrogram``
when ``cfg`` holds the defaults.
"""
from __future__ import annotations

import functools
import numpy as np
import torch

from . import features_np
from .config import FeatureConfig


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None,
                   scale: str = "slaney") -> torch.Tensor:
    """The numpy front-end's triangular mel filters as a tensor, shape (n_mels, n_fft//2+1): one definition for
    the torch and the torch-free paths."""
    return torch.from_numpy(features_np.mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, scale))


def log_mel(samples: torch.Tensor | np.ndarray, cfg: FeatureConfig) -> torch.Tensor:
    """(n_samples,) float samples -> (n_samples // hop, n_mels) normalised log-mel features."""
    samples = torch.as_tensor(samples, dtype=torch.float32)
    window = torch.hann_window(cfg.n_fft, device=samples.device)
    stft = torch.stft(samples, cfg.n_fft, cfg.hop_length, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = stft[..., :-1].abs() ** 2  # drop the last frame, as Whisper does: n_samples // hop frames
    filters = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max, cfg.mel_scale)
    mel = filters.to(samples.device) @ power  # (n_mels, frames)
    if cfg.normalize == "whisper":
        logmel = torch.clamp(mel, min=1e-10).log10()
        logmel = torch.maximum(logmel, logmel.max() - 8.0)
        logmel = (logmel + 4.0) / 4.0
    elif cfg.normalize == "meanvar":
        logmel = torch.log(mel + 1e-6)
        logmel = (logmel - logmel.mean(dim=1, keepdim=True)) / (logmel.std(dim=1, keepdim=True) + 1e-5)
    elif cfg.normalize == "none":
        logmel = torch.log(mel + 1e-6)
    else:
        raise ValueError(f"Unknown feature normalisation {cfg.normalize!r}")
    return logmel.T.contiguous()
