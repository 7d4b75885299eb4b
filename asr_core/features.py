"""Log-mel front-end in torch (torchaudio does not import against the pinned torch, and this is 40 lines).

``log_mel(samples, cfg)`` maps 16 kHz mono samples of shape (n_samples,) to features of shape
(n_frames, n_mels) with n_frames = n_samples // hop_length, exactly as Whisper's ``log_mel_spectrogram``
when ``cfg`` holds the defaults.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .config import FeatureConfig


def hz_to_mel(freq: np.ndarray, scale: str) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    # Slaney (Auditory Toolbox): linear below 1 kHz, logarithmic above.
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    mel = freq / f_sp
    above = freq >= min_log_hz
    mel[above] = min_log_mel + np.log(freq[above] / min_log_hz) / logstep
    return mel


def mel_to_hz(mel: np.ndarray, scale: str) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    freq = f_sp * mel
    above = mel >= min_log_mel
    freq[above] = min_log_hz * np.exp(logstep * (mel[above] - min_log_mel))
    return freq


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None,
                   scale: str = "slaney") -> torch.Tensor:
    """Triangular mel filters, area-normalised for "slaney" (as librosa.filters.mel). Shape (n_mels, n_fft//2+1)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate / 2, 1 + n_fft // 2)
    mel_points = mel_to_hz(np.linspace(hz_to_mel(np.array([f_min]), scale)[0],
                                       hz_to_mel(np.array([f_max]), scale)[0], n_mels + 2), scale)
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if scale == "slaney":
        weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


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
