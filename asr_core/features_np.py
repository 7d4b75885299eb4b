"""The log-mel front-end in numpy, for devices without torch: the same numbers as :func:`asr_core.features.log_mel`.

``log_mel(samples, cfg)``: 16 kHz mono samples (n_samples,) -> features (n_samples // hop, n_mels) float32.
Same steps as the torch version: periodic Hann window, centred frames with reflect padding (torch.stft's
``center=True``), |rfft|², the last frame dropped (Whisper), the triangular mel filterbank, then the
normalisation the config names. The mel filterbank is defined here, and the torch front-end takes it from here.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from .config import FeatureConfig


def hz_to_mel(freq, scale: str) -> np.ndarray:
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


def mel_to_hz(mel, scale: str) -> np.ndarray:
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
                   scale: str = "slaney") -> np.ndarray:
    """Triangular mel filters (area-normalised for "slaney"), float32 (n_mels, n_fft // 2 + 1)."""
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
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=4)
def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window, as torch.hann_window(n_fft) (the default, periodic=True)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float64)


def power_spectrogram(samples: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """(n_samples,) -> |STFT|² (n_samples // hop, n_fft // 2 + 1), float64: centred reflect-padded frames,
    the last one dropped as Whisper does."""
    padded = np.pad(samples.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][: len(samples) // hop]
    spectrum = np.fft.rfft(frames * hann_window(n_fft)[None, :], axis=1)
    return spectrum.real ** 2 + spectrum.imag ** 2


def log_mel(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """(n_samples,) float samples -> (n_samples // hop, n_mels) float32 normalised log-mel features."""
    samples = np.asarray(samples, dtype=np.float32)
    power = power_spectrogram(samples, cfg.n_fft, cfg.hop_length)
    filters = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max, cfg.mel_scale)
    mel = power @ filters.T.astype(np.float64)  # (frames, n_mels)
    if cfg.normalize == "whisper":
        logmel = np.log10(np.maximum(mel, 1e-10))
        if logmel.size:
            logmel = np.maximum(logmel, logmel.max() - 8.0)
        logmel = (logmel + 4.0) / 4.0
    elif cfg.normalize == "meanvar":
        logmel = np.log(mel + 1e-6)
        # torch's std is the unbiased one (n - 1); per mel bin over time
        logmel = (logmel - logmel.mean(axis=0, keepdims=True)) / (logmel.std(axis=0, ddof=1, keepdims=True) + 1e-5)
    elif cfg.normalize == "none":
        logmel = np.log(mel + 1e-6)
    else:
        raise ValueError(f"Unknown feature normalisation {cfg.normalize!r}")
    return np.ascontiguousarray(logmel, dtype=np.float32)
