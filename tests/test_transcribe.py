import numpy as np
import torch

from asr_core.transcribe import Transcriber
from conftest import speechlike


def test_long_audio_is_chunked_and_stitched(tiny_model):
    transcriber = Transcriber(tiny_model, __import__("asr_core").CharTokenizer(), chunk_seconds=12.0,
                              context_seconds=2.0)
    samples = np.concatenate([speechlike(5.0, seed=i) for i in range(9)])  # 45 s: four windows
    whole = transcriber._window_log_probs(samples)
    stitched = transcriber.log_probs(samples)
    assert abs(stitched.shape[0] - whole.shape[0]) <= 2
    # away from window edges the stitched frames are the model's output on a window holding them whole
    frame = transcriber.samples_per_frame
    first_window = transcriber._window_log_probs(samples[: transcriber.chunk])
    cut = (transcriber.chunk - transcriber.context) // frame
    torch.testing.assert_close(stitched[: cut - 2], first_window[: cut - 2])


def test_ten_minute_file_in_bounded_memory(tiny_model_dir, tmp_path):
    """600 s of audio: windows of 30 s, so the model never sees more than 30 s at once."""
    import soundfile as sf

    path = tmp_path / "ten_minutes.flac"
    sf.write(path, np.tile(speechlike(10.0), 60), 16000)
    transcriber = Transcriber.from_folder(tiny_model_dir)
    seen = []
    original = transcriber._window_log_probs

    def spy(samples):
        seen.append(len(samples))
        return original(samples)

    transcriber._window_log_probs = spy
    text = transcriber.transcribe(str(path))
    assert isinstance(text, str)
    assert max(seen) <= transcriber.chunk and len(seen) >= 24
