"""Greedy CTC decoding: log-probs (T', V) -> text. Beam search with a word LM: :mod:`asr_core.beam_search`.

Log-probs may be torch tensors or numpy arrays; this module does not import torch, so the torch-free runner
(:mod:`asr_core.lite`) decodes with it too, and shares with :class:`asr_core.transcribe.Transcriber` the choice
of decoder (:func:`make_decoder`) and the windows long audio is cut into (:func:`windows`).
"""
from __future__ import annotations

import numpy as np

from .errors import SettingsError
from .text import CharTokenizer

CHUNK_SECONDS = 30.0  # longest window the model hears at once (Whisper's window; ~1500 encoder frames)
CONTEXT_SECONDS = 2.5  # each window overlaps its neighbours by this much; only its centre is kept


def windows(n_samples: int, chunk: int, context: int, samples_per_frame: int) -> list[tuple[int, int, int, int]]:
    """(start, end, first kept output frame, end of kept frames) per window: windows of ``chunk`` samples
    stepping by chunk - 2 * context; each keeps the output frames of its centre (from ``context`` in, except the
    first; up to ``context`` before its end, except the last). One window, keeping every frame (end -1), when
    the audio fits in one."""
    if n_samples <= chunk:
        return [(0, n_samples, 0, -1)]
    step, start, out = chunk - 2 * context, 0, []
    while True:
        end = min(start + chunk, n_samples)
        keep_from = 0 if start == 0 else context
        keep_to = (end - start) if end == n_samples else (end - start) - context
        out.append((start, end, round(keep_from / samples_per_frame), round(keep_to / samples_per_frame)))
        if end == n_samples:
            return out
        start += step


def make_decoder(tokenizer: CharTokenizer, folder: str, decoding: str = "auto", beam_settings=None):
    """Greedy, or beam search with the word LM (``lm.arpa.gz`` + ``decoding.json``) shipped in ``folder``."""
    from .beam_search import BeamSearchDecoder, has_lm

    if decoding not in ("auto", "greedy", "lm"):
        raise SettingsError(f"decoding must be auto, greedy or lm, got {decoding!r}")
    if decoding == "greedy" or (decoding == "auto" and not has_lm(folder)):
        return GreedyDecoder(tokenizer)
    return BeamSearchDecoder.from_folder(folder, tokenizer, beam_settings)


def as_numpy(log_probs) -> np.ndarray:
    """A torch tensor (any device or dtype) or an array -> numpy array, without importing torch."""
    if hasattr(log_probs, "detach"):
        return log_probs.detach().float().cpu().numpy()
    return np.asarray(log_probs)


def greedy_ids(log_probs, blank_id: int = 0) -> list[int]:
    """Best path: argmax per frame (the first on ties, as torch), merge repeats, drop blanks.
    log_probs: (T', V) -> token ids."""
    best = as_numpy(log_probs).argmax(axis=-1)
    if best.size == 0:
        return []
    keep = np.ones(best.shape, dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return [i for i in best[keep].tolist() if i != blank_id]


class GreedyDecoder:
    """``decoder(log_probs (T', V)) -> str``."""

    def __init__(self, tokenizer: CharTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, log_probs) -> str:
        return self.tokenizer.decode(greedy_ids(log_probs, self.tokenizer.blank_id))

    def batch(self, log_probs, lengths) -> list[str]:
        """log_probs (B, T', V), lengths (B,) -> B texts."""
        return [self(log_probs[b, : int(n)]) for b, n in enumerate(lengths)]
