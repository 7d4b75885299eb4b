"""Torch-free transcription with an exported ONNX model folder: numpy, soundfile, soxr and onnxruntime only.

    python -m asr_core.lite --model ONNX_DIR [--threads N] [--decoding auto|greedy|lm] [--json] FILE...

prints one transcript per file (``FILE<TAB>text`` when there are several), as ``edge-asr transcribe`` does.
Long audio is cut into the same windows as :meth:`asr_core.transcribe.Transcriber.log_probs` (30 s, 2.5 s of
context each side), the front-end is :mod:`asr_core.features_np` (the torch front-end's numbers to ~1e-5),
and decoding uses the same greedy and LM beam-search decoders, so the text equals the torch-side
transcript of the same ONNX folder. Nothing here imports torch: ``tests/test_lite.py`` runs it with torch
made unimportable.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .audio import SAMPLE_RATE, load_audio
from .decoding import CHUNK_SECONDS, CONTEXT_SECONDS, GreedyDecoder, make_decoder, windows
from .errors import AudioError, EdgeASRError
from .features_np import log_mel
from .onnx_model import OnnxCTC, load_onnx_model
from .text import CharTokenizer


class LiteTranscriber:
    """Samples -> text with an :class:`~asr_core.onnx_model.OnnxCTC`; numpy throughout."""

    def __init__(self, model: OnnxCTC, tokenizer: CharTokenizer, decoder=None, *,
                 chunk_seconds: float = CHUNK_SECONDS, context_seconds: float = CONTEXT_SECONDS):
        if chunk_seconds <= 4 * context_seconds:
            raise ValueError("chunk_seconds must exceed four times context_seconds")
        self.model, self.tokenizer, self.cfg = model, tokenizer, model.cfg
        self.decoder = decoder or GreedyDecoder(tokenizer)
        self.chunk = int(chunk_seconds * SAMPLE_RATE)
        self.context = int(context_seconds * SAMPLE_RATE)
        self.samples_per_frame = self.cfg.features.hop_length * self.cfg.subsampling_factor

    @classmethod
    def from_folder(cls, folder: str, *, threads: int | None = 2, decoding: str = "auto", low_memory: bool = False,
                    **kwargs) -> "LiteTranscriber":
        model, tokenizer = load_onnx_model(folder, threads=threads, low_memory=low_memory)
        return cls(model, tokenizer, make_decoder(tokenizer, folder, decoding), **kwargs)

    def _window_log_probs(self, samples: np.ndarray) -> np.ndarray:
        feats = log_mel(samples, self.cfg.features)
        log_probs, _ = self.model.run(feats[None], np.array([feats.shape[0]], dtype=np.int64))
        return log_probs[0]

    def log_probs(self, samples: np.ndarray) -> np.ndarray:
        """(n_samples,) 16 kHz -> (T', V) log-probs for the whole clip."""
        pieces = []
        for start, end, a, b in windows(len(samples), self.chunk, self.context, self.samples_per_frame):
            window = self._window_log_probs(samples[start:end])
            pieces.append(window if b == -1 else window[a:b])
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def transcribe(self, source) -> str:
        samples = source if isinstance(source, np.ndarray) and source.dtype == np.float32 and source.ndim == 1 \
            else load_audio(source)
        return self.decoder(self.log_probs(samples))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m asr_core.lite",
                                description="Transcribe audio files with an exported ONNX model folder (no torch).")
    p.add_argument("--model", required=True, help="ONNX model folder written by the export (edge-asr-onnx)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--decoding", default="auto", choices=("auto", "greedy", "lm"),
                   help="auto: the word LM where the folder ships one, else greedy")
    p.add_argument("--low-memory", action="store_true",
                   help="no ONNX Runtime weight prepacking: less RAM, possibly slower (see docs)")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.add_argument("files", nargs="+")
    return p


def transcribe_files(transcriber, files: list[str], *, as_json: bool, program: str) -> int:
    """Print each file's text (or a JSON line); a bad file gets one line on stderr and the rest go on. Shared by
    ``edge-asr transcribe`` and this runner (both take anything with ``transcribe(samples) -> text``).
    Returns 1 when any file failed, else 0."""
    failures = 0
    for path in files:
        try:
            samples = load_audio(path)
        except AudioError as err:
            failures += 1
            print(f"{program}: {path}: {err}", file=sys.stderr)
            continue
        start = time.perf_counter()
        text = transcriber.transcribe(samples)
        if as_json:
            print(json.dumps({"file": path, "text": text, "audio_seconds": round(len(samples) / SAMPLE_RATE, 3),
                              "seconds": round(time.perf_counter() - start, 3)}))
        else:
            print(text if len(files) == 1 else f"{path}\t{text}")
    return 1 if failures else 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        transcriber = LiteTranscriber.from_folder(args.model, threads=args.threads, decoding=args.decoding,
                                                  low_memory=args.low_memory)
    except EdgeASRError as err:
        print(f"edge-asr lite: {err}", file=sys.stderr)
        return 2
    return transcribe_files(transcriber, args.files, as_json=args.json, program="edge-asr lite")


if __name__ == "__main__":
    raise SystemExit(main())
