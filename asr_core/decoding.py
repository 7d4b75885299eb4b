"""Greedy CTC decoding: log-probs (T', V) -> text. Beam search with a word LM: :mod:`asr_core.beam_search`.

Log-probs may be torch tensors or numpy arrays; this module does not import torch, so the torch-free runner
(:mod:`asr_core.lite`) decodes with it too.
"""
from __future__ import annotations

import numpy as np

from .text import CharTokenizer


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
