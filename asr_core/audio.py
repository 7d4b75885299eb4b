"""Audio in: any file soundfile can read, or a numpy array, to 16 kHz mono float32 in [-1, 1].

Everything that reaches the model goes through :func:`load_audio`, so the CLI, the data sets and the app
agree on resampling, down-mixing and the checks for bad input. Every failure is an :class:`AudioError`
with a message a person understands.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError

SAMPLE_RATE = 16000  # Hz: the rate every model of this project hears
MIN_RATE, MAX_RATE = 4000, 384000  # rates outside this range are almost surely a mistake
SILENCE_PEAK = 1e-4  # a clip whose loudest sample is below this (-80 dBFS) has nothing to recognise
MIN_SECONDS = 0.1  # shorter than this is not speech

AudioSource = Union[str, os.PathLike, tuple, np.ndarray]


def _to_float32(samples: np.ndarray) -> np.ndarray:
    """Scale integer PCM to [-1, 1]; float input with a peak above 1 is scaled down by its peak."""
    if samples.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        return (samples.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(samples.dtype, np.integer):
        return samples.astype(np.float32) / float(np.iinfo(samples.dtype).max + 1)
    if not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(f"Audio samples must be numbers, got dtype {samples.dtype}.")
    samples = samples.astype(np.float32, copy=False)
    if not np.all(np.isfinite(samples)):
        raise AudioError("The audio holds NaN or infinite samples; it is corrupt.")
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    return samples / peak if peak > 1.0 else samples


def _to_mono(samples: np.ndarray) -> np.ndarray:
    """Down-mix (frames, channels) — or (channels, frames) when that is clearly the layout — to (frames,)."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"Audio must have 1 or 2 dimensions (frames[, channels]), got shape {samples.shape}.")
    if samples.shape[0] < samples.shape[1] and samples.shape[0] <= 16:
        samples = samples.T  # (channels, frames) as some libraries hand it over
    return samples.mean(axis=1)


def resample(samples: np.ndarray, rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling (libsoxr, 'HQ'): a proper anti-aliasing filter, unlike linear interpolation."""
    if rate == target_rate:
        return samples
    return soxr.resample(samples, rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def _read_file(path: str) -> tuple[np.ndarray, int]:
    if not os.path.exists(path):
        raise AudioError(f"No such audio file: {path}")
    if os.path.isdir(path):
        raise AudioError(f"{path} is a folder, not an audio file.")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path} is empty (0 bytes).")
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        reason = str(err).rsplit(":", 1)[-1].strip()  # libsndfile's own words, without the temp-file path
        raise AudioError(
            f"Failed to load audio from {os.path.basename(path)}: it is not a WAV, FLAC, OGG/Vorbis, Opus or MP3 "
            f"file that can be decoded ({reason})."
        ) from None
    return samples, int(rate)


def load_audio(
    source: AudioSource,
    rate: int | None = None,
    *,
    max_seconds: float | None = None,
    allow_silence: bool = False,
) -> np.ndarray:
    """Return 16 kHz mono float32 samples in [-1, 1].

    Args:
        source: a file path; a ``(rate, samples)`` tuple as Gradio hands over (int16 or float, mono or
            ``(frames, channels)``); or a bare array, whose rate is ``rate`` (default 16000).
        rate: sample rate of a bare array.
        max_seconds: reject longer audio with a clear message instead of working on it.
        allow_silence: accept audio whose peak is below -80 dBFS (the model then simply hears nothing).

    Returns:
        samples: float32 array of shape (n_samples,).

    Raises:
        AudioError: missing, empty, corrupt or non-audio file; zero-length, silent, too long or NaN/inf audio.
    """
    if source is None:
        raise AudioError("No audio was given.")
    if isinstance(source, (str, os.PathLike)):
        samples, rate = _read_file(os.fspath(source))
    elif isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("Audio given as a tuple must be (sample_rate, samples).")
        rate, samples = source
        samples = np.asarray(samples)
    elif isinstance(source, np.ndarray):
        samples, rate = source, rate or SAMPLE_RATE
    else:
        raise AudioError(f"Cannot read audio from a {type(source).__name__}; give a file path or an array.")
    try:
        rate = int(rate)
    except (TypeError, ValueError):
        raise AudioError(f"The sample rate must be a number, got {rate!r}.") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"Sample rate {rate} Hz is outside the supported range {MIN_RATE}-{MAX_RATE} Hz.")
    if samples.size == 0:
        raise AudioError("The audio has no samples (zero length).")
    samples = _to_mono(_to_float32(samples))
    if not np.all(np.isfinite(samples)):
        raise AudioError("The audio holds NaN or infinite samples; it is corrupt.")
    seconds = samples.shape[0] / rate
    if seconds < MIN_SECONDS:
        raise AudioError(f"The audio is only {seconds * 1000:.0f} ms long; at least {MIN_SECONDS:.1f} s is needed.")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"The audio is {seconds:.1f} s long; the limit here is {max_seconds:.0f} s.")
    if not allow_silence and float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise AudioError("The audio is silent (its loudest sample is below -80 dBFS); there is nothing to recognise.")
    return np.ascontiguousarray(resample(samples, rate), dtype=np.float32)


def audio_duration(path: str) -> float:
    """Duration in seconds from the file header, without decoding the samples."""
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"Failed to read audio header of {path}: {err}") from None
    return info.frames / info.samplerate
