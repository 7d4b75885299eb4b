"""edge-asr listen without a sound card: its stream callback is fed recorded audio in 100 ms blocks."""
import subprocess
import sys

import numpy as np

from asr_core.audio import load_audio
from asr_core.listen import LiveTranscriber
from conftest import REPO


class EchoTranscriber:
    """Stands in for the model: 'hears' how many seconds it was given, so the stream logic is visible."""

    def transcribe(self, samples):
        return f"{len(samples) // 16000} s"


def test_callback_stream_gives_partials_and_bounded_lines(dev_dir):
    samples = load_audio(str(next((dev_dir / "1272").rglob("*.opus"))))
    live = LiveTranscriber(EchoTranscriber(), window_seconds=4.0, step_seconds=1.0)
    updates = []
    for start in range(0, len(samples) - 1600, 1600):
        block = samples[start:start + 1600][:, None]  # (frames, channels), as sounddevice delivers it
        live.callback(block, len(block), None, None)
        updates += live.poll()
    finals = [t for kind, t in updates if kind == "final"]
    partials = [t for kind, t in updates if kind == "partial"]
    assert finals and all(t == "4 s" for t in finals)  # each committed line covers one full window
    assert partials[:3] == ["1 s", "2 s", "3 s"]
    assert len(live.buffer) < 4 * 16000  # memory stays bounded


def test_real_model_through_the_callback(tiny_model_dir, dev_dir):
    from asr_core.transcribe import Transcriber

    samples = load_audio(str(next((dev_dir / "1272").rglob("*.opus"))))[: 3 * 16000]
    live = LiveTranscriber(Transcriber.from_folder(tiny_model_dir), window_seconds=2.0, step_seconds=0.5)
    for start in range(0, len(samples), 1600):
        block = samples[start:start + 1600, None]
        live.callback(block, len(block), None, None)
    assert any(kind == "final" for kind, _ in live.poll())


def test_without_an_input_device_it_says_so():
    result = subprocess.run([sys.executable, "-m", "edge_asr", "listen"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "edge-asr listen:" in result.stderr and "Traceback" not in result.stderr
