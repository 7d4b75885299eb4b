import numpy as np
import pytest
import soundfile as sf

from asr_core.audio import SAMPLE_RATE, load_audio
from asr_core.errors import AudioError
from conftest import speechlike


@pytest.mark.parametrize("fmt,subtype,ext", [
    ("WAV", "PCM_16", "wav"), ("WAV", "FLOAT", "wav"), ("FLAC", "PCM_24", "flac"),
    ("OGG", "VORBIS", "ogg"), ("OGG", "OPUS", "opus"), ("MP3", "MPEG_LAYER_III", "mp3"),
])
def test_reads_every_format(tmp_path, fmt, subtype, ext):
    rate = 48000 if subtype == "OPUS" else 16000
    path = tmp_path / f"clip.{ext}"
    sf.write(path, speechlike(1.0, rate), rate, format=fmt, subtype=subtype)
    x = load_audio(str(path))
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - SAMPLE_RATE) < 0.06 * SAMPLE_RATE  # codecs may pad a few ms
    assert 0.1 < np.abs(x).max() <= 1.0


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_resamples_any_rate_to_16k(tmp_path, rate):
    path = tmp_path / "clip.wav"
    sf.write(path, speechlike(2.0, rate), rate)
    assert len(load_audio(str(path))) == 2 * SAMPLE_RATE


def test_resampler_is_antialiased():
    """A 7 kHz tone at 48 kHz passes; a 12 kHz tone (above the new Nyquist) must not alias down to 4 kHz."""
    t = np.arange(48000) / 48000
    passed = load_audio((48000, (0.5 * np.sin(2 * np.pi * 7000 * t)).astype(np.float32)))
    aliased = load_audio((48000, (0.5 * np.sin(2 * np.pi * 12000 * t)).astype(np.float32)), allow_silence=True)
    assert np.sqrt(np.mean(passed ** 2)) > 0.3
    assert np.sqrt(np.mean(aliased ** 2)) < 0.01


def test_stereo_downmix_and_int16_tuple_as_gradio_gives():
    mono = speechlike(1.0)
    stereo = np.stack([mono, mono], axis=1)
    pcm = (stereo * 32767).astype(np.int16)
    x = load_audio((16000, pcm))
    np.testing.assert_allclose(x, mono, atol=1e-3)
    channels_first = load_audio((16000, pcm.T))
    np.testing.assert_allclose(channels_first, x, atol=1e-6)


def test_int_scaling():
    assert load_audio((16000, np.full(3200, -32768, np.int16))).min() == -1.0
    assert abs(load_audio((16000, np.full(3200, 2 ** 30, np.int32))).max() - 0.5) < 1e-6


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_text("this is not audio at all " * 50), "Failed to load audio"),
    (lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40)), "Failed to load audio"),
])
def test_bad_files_raise_audio_error(tmp_path, make, message):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioError, match=message):
        load_audio(str(path))


def test_missing_file():
    with pytest.raises(AudioError, match="No such audio file"):
        load_audio("/nonexistent/clip.wav")


def test_bad_arrays():
    with pytest.raises(AudioError, match="zero length"):
        load_audio((16000, np.zeros(0, np.int16)))
    with pytest.raises(AudioError, match="silent"):
        load_audio((16000, np.zeros(16000, np.int16)))
    bad = speechlike(1.0)
    bad[100] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        load_audio((16000, bad))
    with pytest.raises(AudioError, match="sample rate|Sample rate"):
        load_audio((0, speechlike(1.0)))
    with pytest.raises(AudioError, match="limit"):
        load_audio((16000, speechlike(3.0)), max_seconds=2)
    with pytest.raises(AudioError, match="No audio"):
        load_audio(None)
    assert issubclass(AudioError, ValueError)
