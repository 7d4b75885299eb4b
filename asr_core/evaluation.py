"""Corpus WER/CER (jiwer), latency and real-time factor of any model folder on a data set."""
from __future__ import annotations

import os
import statistics
import time

import jiwer
import numpy as np
import torch
from tqdm import tqdm

from .audio import SAMPLE_RATE, load_audio
from .checkpoint import folder_bytes
from .data import Utterance
from .decoding import GreedyDecoder
from .model import count_parameters
from .text import normalize_text
from .transcribe import Transcriber


def error_rates(references: list[str], hypotheses: list[str]) -> dict:
    """Corpus-level WER and CER over normalised text (jiwer sums edits over the corpus, not a mean of rates)."""
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    # jiwer refuses empty references; an empty reference contributes its hypothesis words as insertions
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    extra_insertions = sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    if not pairs:
        return {"wer": float("nan"), "cer": float("nan"), "substitutions": 0, "deletions": 0,
                "insertions": extra_insertions, "hits": 0, "reference_words": 0}
    r, h = zip(*pairs)
    words = jiwer.process_words(list(r), list(h))
    chars = jiwer.process_characters(list(r), list(h))
    n_ref_words = words.hits + words.substitutions + words.deletions
    return {
        "wer": (words.substitutions + words.deletions + words.insertions + extra_insertions) / n_ref_words,
        "cer": chars.cer,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions + extra_insertions,
        "hits": words.hits,
        "reference_words": n_ref_words,
    }


@torch.inference_mode()
def decode_batches(model: torch.nn.Module, decoder: GreedyDecoder, loader, device: str = "cpu") -> dict[str, str]:
    """Batched greedy decoding of a DataLoader built with ``data.collate`` -> {utterance id: hypothesis}."""
    model.eval()
    out = {}
    for batch in loader:
        log_probs, lengths = model(batch["features"].to(device), batch["lengths"].to(device))
        out.update(zip(batch["ids"], decoder.batch(log_probs.cpu(), lengths.cpu())))
    return out


def timed_decode(transcriber: Transcriber, samples: np.ndarray) -> tuple[str, torch.Tensor, float]:
    """The latency this project reports everywhere (evaluate, benchmark, the app's tabs): wall seconds from 16 kHz
    samples in memory to text, features + model + decoder, on a warm model. Audio decoding and resampling are
    left out (they depend on the file, not the model). Returns (text, log-probs, seconds)."""
    start = time.perf_counter()
    log_probs = transcriber.log_probs(samples)
    text = transcriber.decoder(log_probs)
    return text, log_probs, time.perf_counter() - start


def evaluate(transcriber: Transcriber, utterances: list[Utterance], *, warmup: int = 2,
             model_dir: str | None = None, progress: bool = True) -> dict:
    """One utterance at a time, as a device would see them: hypotheses, corpus WER/CER, latency, RTF.

    Latency per utterance is :func:`timed_decode`, measured after ``warmup`` untimed utterances, with the
    process's torch threads (set once by the entry point) or the ONNX session's own.
    """
    audio = [load_audio(u.audio_path, allow_silence=True) for u in tqdm(utterances, desc="loading audio",
                                                                        disable=not progress)]
    for samples in audio[:warmup]:
        transcriber.transcribe(samples)
    hypotheses, greedy_hypotheses, latencies = [], [], []
    with_lm = not isinstance(transcriber.decoder, GreedyDecoder)
    for samples in tqdm(audio, desc="decoding", disable=not progress):
        text, log_probs, seconds = timed_decode(transcriber, samples)
        hypotheses.append(text)
        latencies.append(seconds)
        if with_lm:  # greedy from the same log-probs, outside the timing: reported apart
            greedy_hypotheses.append(transcriber.greedy(log_probs))
    result = error_rates([u.text for u in utterances], hypotheses)
    result["decoding"] = "beam search + LM" if with_lm else "greedy"
    if with_lm:
        greedy = error_rates([u.text for u in utterances], greedy_hypotheses)
        result["greedy"] = {"wer": greedy["wer"], "cer": greedy["cer"]}
    result.update(_timing(audio, latencies, transcriber.model))
    result.update({
        "n_utterances": len(utterances),
        "bytes_on_disk": folder_bytes(model_dir) if model_dir and os.path.isdir(model_dir) else None,
        "utterances": [{"id": u.id, "reference": normalize_text(u.text), "hypothesis": h}
                       for u, h in zip(utterances, hypotheses)],
    })
    return result


def latency_figures(audio: list[np.ndarray], latencies: list[float]) -> dict:
    """Audio and wall seconds, RTF, median and p90 latency (ms) of per-utterance timings: the figures every
    evaluation reports, ours and the peers' alike."""
    audio_seconds = sum(len(a) for a in audio) / SAMPLE_RATE
    wall = sum(latencies)
    return {"audio_seconds": round(audio_seconds, 3), "wall_seconds": round(wall, 3),
            "rtf": wall / audio_seconds if audio_seconds else float("nan"),
            "latency_ms_median": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "latency_ms_p90": 1000 * float(np.percentile(latencies, 90)) if latencies else float("nan")}


def _timing(audio: list[np.ndarray], latencies: list[float], model) -> dict:
    return {**latency_figures(audio, latencies),
            "threads": getattr(model, "threads", None) or torch.get_num_threads(),
            "params": count_parameters(model)}


def summary_line(result: dict) -> str:
    """One line of an evaluation's figures, for the terminal."""
    greedy = f"  (greedy WER {result['greedy']['wer']:.2%} CER {result['greedy']['cer']:.2%})" \
        if "greedy" in result else ""
    return (f"{result['decoding']}: WER {result['wer']:.2%}  CER {result['cer']:.2%}{greedy}  RTF {result['rtf']:.3f}  "
            f"latency median {result['latency_ms_median']:.0f} ms")
