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
from .distributed import World, gather_objects, shard_bounds
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
             model_dir: str | None = None, progress: bool = True, world: World = World()) -> dict:
    """One utterance at a time, as a device would see them: hypotheses, corpus WER/CER, latency, RTF.

    Latency per utterance is :func:`timed_decode`, measured after ``warmup`` untimed utterances, with the
    process's torch threads (set once by the entry point) or the ONNX session's own.

    Under torchrun (``world``) each rank decodes a contiguous share and rank 0 scores all the hypotheses at
    once, so the WER is the single-process corpus WER (never a mean of per-shard rates); the result adds
    ``world_size`` and ``shard_sizes``. Every rank returns the same result.
    """
    start, stop = shard_bounds(len(utterances), world)
    shard = _decode_shard(transcriber, utterances[start:stop], warmup, progress and world.is_main)
    parts = gather_objects(world, shard)
    merged = {key: [x for part in parts for x in part[key]] for key in shard}
    hypotheses, greedy_hypotheses = merged["hypotheses"], merged["greedy"]
    with_lm = not isinstance(transcriber.decoder, GreedyDecoder)
    result = error_rates([u.text for u in utterances], hypotheses)
    result["decoding"] = "beam search + LM" if with_lm else "greedy"
    if with_lm:
        greedy = error_rates([u.text for u in utterances], greedy_hypotheses)
        result["greedy"] = {"wer": greedy["wer"], "cer": greedy["cer"]}
    result.update(_timing(merged["samples"], merged["latencies"], transcriber.model))
    result.update({
        "n_utterances": len(utterances),
        "bytes_on_disk": folder_bytes(model_dir) if model_dir and os.path.isdir(model_dir) else None,
        **({"world_size": world.size, "shard_sizes": [len(p["hypotheses"]) for p in parts]} if world.active else {}),
        "utterances": [{"id": u.id, "reference": normalize_text(u.text), "hypothesis": h}
                       for u, h in zip(utterances, hypotheses)],
    })
    return result


def _decode_shard(transcriber: Transcriber, utterances: list[Utterance], warmup: int, progress: bool) -> dict:
    """Hypotheses (and greedy ones from the same log-probs when decoding with the LM, outside the timing),
    per-utterance latencies and sample counts of the utterances one process decodes."""
    audio = [load_audio(u.audio_path, allow_silence=True) for u in tqdm(utterances, desc="loading audio",
                                                                        disable=not progress)]
    for samples in audio[:warmup]:
        transcriber.transcribe(samples)
    out = {"hypotheses": [], "greedy": [], "latencies": [], "samples": [len(a) for a in audio]}
    with_lm = not isinstance(transcriber.decoder, GreedyDecoder)
    for samples in tqdm(audio, desc="decoding", disable=not progress):
        text, log_probs, seconds = timed_decode(transcriber, samples)
        out["hypotheses"].append(text)
        out["latencies"].append(seconds)
        if with_lm:
            out["greedy"].append(transcriber.greedy(log_probs))
    return out


def latency_figures(sample_counts: list[int], latencies: list[float]) -> dict:
    """Audio and wall seconds, RTF, median and p90 latency (ms) of per-utterance timings: the figures every
    evaluation reports, ours and the peers' alike. ``sample_counts``: each clip's length at 16 kHz."""
    audio_seconds = sum(sample_counts) / SAMPLE_RATE
    wall = sum(latencies)
    return {"audio_seconds": round(audio_seconds, 3), "wall_seconds": round(wall, 3),
            "rtf": wall / audio_seconds if audio_seconds else float("nan"),
            "latency_ms_median": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "latency_ms_p90": 1000 * float(np.percentile(latencies, 90)) if latencies else float("nan")}


def _timing(sample_counts: list[int], latencies: list[float], model) -> dict:
    return {**latency_figures(sample_counts, latencies),
            "threads": getattr(model, "threads", None) or torch.get_num_threads(),
            "params": count_parameters(model)}


def summary_line(result: dict) -> str:
    """One line of an evaluation's figures, for the terminal."""
    greedy = f"  (greedy WER {result['greedy']['wer']:.2%} CER {result['greedy']['cer']:.2%})" \
        if "greedy" in result else ""
    return (f"{result['decoding']}: WER {result['wer']:.2%}  CER {result['cer']:.2%}{greedy}  RTF {result['rtf']:.3f}  "
            f"latency median {result['latency_ms_median']:.0f} ms")
