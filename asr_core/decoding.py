"""Greedy CTC decoding: log-probs (T', V) -> text. Beam search with a word LM: :mod:`asr_core.beam_search`."""
from __future__ import annotations

import torch

from .text import CharTokenizer


def greedy_ids(log_probs: torch.Tensor, blank_id: int = 0) -> list[int]:
    """Best path: argmax per frame, merge repeats, drop blanks. log_probs: (T', V) -> token ids."""
    best = log_probs.argmax(dim=-1)
    if best.numel() == 0:
        return []
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[1:] = best[1:] != best[:-1]
    return [i for i in best[keep].tolist() if i != blank_id]


class GreedyDecoder:
    """``decoder(log_probs (T', V)) -> str``."""

    def __init__(self, tokenizer: CharTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, log_probs: torch.Tensor) -> str:
        return self.tokenizer.decode(greedy_ids(log_probs, self.tokenizer.blank_id))

    def batch(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """log_probs (B, T', V), lengths (B,) -> B texts."""
        return [self(log_probs[b, : int(n)]) for b, n in enumerate(lengths)]
