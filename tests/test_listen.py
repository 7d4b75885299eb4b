"""The streaming engine (asr_core.streaming) behind `edge-asr listen` and the Live tab, without a sound card:
recorded audio fed in blocks."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from asr_core.audio import load_audio
from asr_core.errors import SettingsError
from asr_core.evaluation import error_rates
from asr_core.listen import LiveTranscriber
from asr_core.streaming import StreamingRecognizer, StreamSettings, last_pause_end
from conftest import REPO

SHIPPED = REPO / "checkpoints" / "conformer-ctc-whisper-base"
CLIP = REPO / "assets" / "clips" / "1272-135031-0000.opus"  # 10.9 s


class FakeTranscriber:
    """Stands in for the model: one output frame per 320 samples, blank except a 'word' frame every 0.6 s, so
    pauses (blank runs) are where the test puts them; decodes to the number of word frames it was given."""

    samples_per_frame = 320

    def log_probs(self, samples):
        frames = len(samples) // 320
        lp = torch.full((frames, 3), -10.0)
        lp[:, 0] = 0.0
        lp[::30, 0], lp[::30, 1] = -10.0, 0.0
        return lp

    def decoder(self, log_probs):
        return f"{int((log_probs.argmax(-1) == 1).sum())}w"

    def greedy(self, log_probs):  # the fast decoder of the partial text
        return "greedy " + self.decoder(log_probs)


def test_pauses_are_found_in_the_middle_of_a_blank_run():
    lp = torch.zeros(20, 3)
    lp[:, 0] = -5.0
    lp[5:12, 0] = 5.0  # blank run 5..11
    assert last_pause_end(lp, 4) == 8
    assert last_pause_end(lp, 8) is None


def test_memory_stays_bounded_over_ten_minutes_of_blocks():
    engine = StreamingRecognizer(FakeTranscriber(), StreamSettings(step_seconds=0.5, max_window_seconds=6.0))
    block = np.full(8000, 0.01, np.float32)  # not silent: silence is skipped without decoding
    for _ in range(1200):  # 10 minutes in 0.5 s blocks
        update = engine.feed(block)
        assert len(engine.pending) <= 6.5 * 16000 and len(engine.context) <= 1.5 * 16000
    assert update.audio_seconds == pytest.approx(600.0)
    assert len(engine.committed) > 50  # it kept committing
    final = engine.finish()
    assert final.partial == "" and len(engine.pending) == 0


def test_silence_is_not_decoded_into_words():
    engine = StreamingRecognizer(FakeTranscriber())
    for _ in range(20):
        engine.feed(np.zeros(8000, np.float32))
    assert engine.finish().committed == [] and len(engine.pending) == 0


def test_partials_are_greedy_and_committed_lines_use_the_transcribers_decoder():
    """The partial text (replaced every step) is decoded greedily, the committed lines by the transcriber's own
    decoder (the LM's beam search in the app); partials="same" decodes both with the latter."""
    block = np.full(8000, 0.01, np.float32)
    for partials, prefix in (("greedy", "greedy "), ("same", "")):
        engine = StreamingRecognizer(FakeTranscriber(), StreamSettings(partials=partials))
        updates = [u for _ in range(20) if (u := engine.feed(block)) is not None]
        assert updates[0].partial.startswith("greedy ") == (partials == "greedy")
        assert updates[0].partial.removeprefix(prefix).endswith("w")
        assert engine.committed and not any(line.startswith("greedy") for line in engine.committed)


def test_bad_settings_are_refused():
    with pytest.raises(SettingsError, match="step_seconds"):
        StreamSettings(step_seconds=0)
    with pytest.raises(SettingsError, match="max_window_seconds"):
        StreamSettings(max_window_seconds=60)
    with pytest.raises(SettingsError, match="partials"):
        StreamSettings(partials="lm")


def test_committed_text_of_clips_in_half_second_blocks_is_as_good_as_offline():
    """The shipped model, greedy, three bundled clips fed in 0.5 s blocks: the committed text's WER against the
    references is within +10% relative (+1 point for so few words) of decoding each clip at once. The ten clips
    with and without the LM: `python scripts/stream_accuracy.py` (docs/RESULTS.md, "Live captions")."""
    import json

    from asr_core.transcribe import Transcriber

    transcriber = Transcriber.from_folder(str(SHIPPED), decoding="greedy")
    clips = json.loads((REPO / "assets" / "clips" / "clips.json").read_text())[:3]
    references, offline, streamed = [], [], []
    for clip in clips:
        samples = load_audio(str(REPO / "assets" / "clips" / clip["file"]))
        engine = StreamingRecognizer(transcriber)
        partials = [u.text for s in range(0, len(samples), 8000)
                    if (u := engine.feed(samples[s:s + 8000])) is not None]
        assert partials and any(partials[:4])  # captions appear within the first two seconds of audio
        references.append(clip["text"])
        offline.append(transcriber.transcribe(samples))
        streamed.append(" ".join(engine.finish().committed))
    wer_offline = error_rates(references, offline)["wer"]
    wer_streamed = error_rates(references, streamed)["wer"]
    assert wer_streamed <= 1.10 * wer_offline + 0.01, (wer_streamed, wer_offline, streamed)


def test_callback_stream_gives_partials_and_lines(tiny_model_dir, dev_dir):
    from asr_core.transcribe import Transcriber

    samples = load_audio(str(next((dev_dir / "1272").rglob("*.opus"))))[: 6 * 16000]
    live = LiveTranscriber(Transcriber.from_folder(tiny_model_dir), StreamSettings(max_window_seconds=4.0))
    updates = []
    for start in range(0, len(samples), 1600):
        block = samples[start:start + 1600, None]  # (frames, channels), as sounddevice delivers it
        live.callback(block, len(block), None, None)
        updates += live.poll()
    updates += live.poll(final=True)
    assert {kind for kind, _ in updates} <= {"partial", "final"}
    assert len(live.engine.pending) == 0


def test_without_an_input_device_it_says_so():
    result = subprocess.run([sys.executable, "-m", "edge_asr", "listen"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "edge-asr listen:" in result.stderr and "Traceback" not in result.stderr
