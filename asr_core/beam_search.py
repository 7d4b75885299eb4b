"""CTC prefix beam search over characters, with an optional word n-gram language model (shallow fusion).

Hannun et al. (2014), "First-pass large vocabulary continuous speech recognition using bi-directional
recurrent DNNs": each hypothesis is a character prefix with two probabilities, ending in blank or not, so
that paths which collapse to the same text are summed. A word is scored by the LM when the space after it
is emitted (``alpha * ln P(word | history) + beta``); while a word is still being spelt, a prefix that no
vocabulary word starts with is charged the LM's unknown-word cost at once, so misspellings fall out of the
beam early instead of at the next space (pyctcdecode does the same). ``unk_penalty`` adds a further cost to
every word outside the LM's vocabulary: 0 is plain shallow fusion, a large value (say 10) all but restricts
the output to the vocabulary, like a lexicon-constrained decoder (flashlight's), while still letting a
name through when the acoustics are sure of it. ``blank_penalty`` is subtracted from the blank's score in
every frame before the search (then each frame is renormalised), as icefall's decoders do: an acoustic model
that is unsure spends too many frames on blank, and the LM then prefers dropping a word to spelling it.
``temperature`` divides the acoustic log-probs before all that (then renormalises; NeMo's CTC decoders call it
softmax temperature): a model trained for many epochs on a few hours is over-confident, its runners-up sit far
below the best token, and the LM cannot reach them; above 1 flattens each frame so that it can.
Why written here: pyctcdecode pins numpy<2 and flashlight-text's decoder wants KenLM binaries; the algorithm is
100 lines of Python.

Cost: per output frame, beams x (tokens above ``token_min_logp``, at most ``token_max``); frames that are only
blank cost almost nothing. About 17 ms per second of audio at beam 128 on one core of the 2-core CPU this was
developed on.
"""
from __future__ import annotations

import heapq
import json
import math
import os
from dataclasses import asdict, dataclass
from operator import itemgetter

import numpy as np

from .decoding import as_numpy
from .errors import SettingsError
from .lm import EOS, NGramLM
from .text import CharTokenizer

LM_FILE, DECODING_FILE = "lm.arpa.gz", "decoding.json"
_NEG = -1e30


@dataclass
class BeamSettings:
    beam_width: int = 32
    alpha: float = 0.6  # LM weight (natural-log scale)
    beta: float = 1.5  # bonus per word: offsets the LM's bias towards fewer, longer words
    token_min_logp: float = -8.0  # tokens less likely than this in a frame are not tried
    token_max: int = 0  # at most this many of them, the likeliest (0: no cap); bounds a damaged model's flat frames
    beam_prune_logp: float = -12.0  # hypotheses this far below the best are dropped
    unk_penalty: float = 0.0  # extra cost (natural log) of a word outside the LM's vocabulary
    blank_penalty: float = 0.0  # subtracted from the blank's log-prob in every frame (then renormalised)
    temperature: float = 1.0  # acoustic log-probs divided by this (then renormalised), before the blank penalty

    def validate(self) -> "BeamSettings":
        if not 1 <= self.beam_width <= 1024:
            raise SettingsError(f"beam width must be between 1 and 1024, got {self.beam_width}")
        if not (0 <= self.alpha <= 10 and -10 <= self.beta <= 10):
            raise SettingsError(f"alpha must be in [0, 10] and beta in [-10, 10], got {self.alpha}, {self.beta}")
        if not 0 <= self.unk_penalty <= 100:
            raise SettingsError(f"the unknown-word penalty must be between 0 and 100, got {self.unk_penalty}")
        if not 0 <= self.blank_penalty <= 10:
            raise SettingsError(f"the blank penalty must be between 0 and 10, got {self.blank_penalty}")
        if not 0.1 <= self.temperature <= 10:
            raise SettingsError(f"the temperature must be between 0.1 and 10, got {self.temperature}")
        if not 0 <= self.token_max <= 10_000:
            raise SettingsError(f"the tokens tried per frame must be between 0 (no cap) and 10000, "
                                f"got {self.token_max}")
        return self

    @classmethod
    def for_folder(cls, folder: str, **overrides) -> "BeamSettings":
        """The folder's ``decoding.json`` (defaults where it has none), with ``overrides`` that are not None."""
        path = os.path.join(folder, DECODING_FILE)
        settings = cls.from_file(path) if os.path.exists(path) else cls()
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        return settings.validate()

    @classmethod
    def from_file(cls, path: str) -> "BeamSettings":
        with open(path) as f:
            data = json.load(f)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known).validate()

    def to_file(self, path: str, **extra) -> None:
        with open(path, "w") as f:
            json.dump({**asdict(self), **extra}, f, indent=2)


def has_lm(folder: str) -> bool:
    """Whether a model folder ships a word LM."""
    return os.path.exists(os.path.join(folder, LM_FILE))


class _Hyp:
    __slots__ = ("p_blank", "p_char", "lm", "history", "word", "partial_cost")

    def __init__(self, lm: float, history: tuple, word: str, partial_cost: float):
        self.p_blank = _NEG
        self.p_char = _NEG
        self.lm = lm  # alpha * ln P of completed words + beta * words
        self.history = history  # the last (order - 1) completed words
        self.word = word  # the word being spelt
        self.partial_cost = partial_cost  # anticipated cost of an unknown word, removed when it completes


def _logadd(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a if b <= _NEG else a + math.log1p(math.exp(b - a))


class BeamSearchDecoder:
    """``decoder(log_probs (T', V)) -> str``, like :class:`~asr_core.decoding.GreedyDecoder`."""

    def __init__(self, tokenizer: CharTokenizer, lm: NGramLM | None = None, settings: BeamSettings | None = None):
        self.tokenizer = tokenizer
        self.lm = lm
        self.settings = (settings or BeamSettings()).validate()
        self.space_id = tokenizer.tokens.index(" ")
        self._lm_cache: dict[tuple, float] = {}
        self._prefixes: set[str] = set()
        if lm is not None:
            for word in lm.vocab:
                for i in range(1, len(word) + 1):
                    self._prefixes.add(word[:i])
            # charged while an out-of-vocabulary word is spelt; replaced by its real score when it completes
            self._unk_cost = self.settings.alpha * lm.score((), "\x00unknown") - self.settings.unk_penalty

    @classmethod
    def from_folder(cls, folder: str, tokenizer: CharTokenizer, settings: BeamSettings | None = None
                    ) -> "BeamSearchDecoder":
        """The LM (``lm.arpa.gz``) and tuned settings (``decoding.json``) that ship in a model folder."""
        if not has_lm(folder):
            raise SettingsError(f"{folder} has no language model ({LM_FILE})")
        return cls(tokenizer, NGramLM.read_arpa(os.path.join(folder, LM_FILE)),
                   settings or BeamSettings.for_folder(folder))

    def _word_score(self, history: tuple, word: str) -> float:
        key = (history, word)
        score = self._lm_cache.get(key)
        if score is None:
            score = self.settings.alpha * self.lm.score(history, word) + self.settings.beta
            if word not in self.lm.vocab:
                score -= self.settings.unk_penalty
            if len(self._lm_cache) > 200_000:
                self._lm_cache.clear()
            self._lm_cache[key] = score
        return score

    def _extend(self, parent: _Hyp, char: str) -> _Hyp:
        if self.lm is None:
            return _Hyp(0.0, (), "", 0.0)
        if char == " ":
            return _Hyp(parent.lm + self._word_score(parent.history, parent.word),
                        self.lm.next_history(parent.history, parent.word), "", 0.0)
        word = parent.word + char
        cost = 0.0 if word in self._prefixes else self._unk_cost
        return _Hyp(parent.lm, parent.history, word, cost)

    def __call__(self, log_probs) -> str:
        """log_probs: (T', V), a torch tensor or a numpy array."""
        s = self.settings
        lp = as_numpy(log_probs).astype(np.float64)
        blank, space = self.tokenizer.blank_id, self.space_id
        if s.temperature != 1.0:
            lp /= s.temperature
        if s.blank_penalty:
            lp[:, blank] -= s.blank_penalty
        if s.temperature != 1.0 or s.blank_penalty:  # one renormalisation serves both
            lp -= np.logaddexp.reduce(lp, axis=1, keepdims=True)
        tokens = self.tokenizer.tokens
        start = _Hyp(0.0, ("<s>",) if self.lm is not None and self.lm.order > 1 else (), "", 0.0)
        start.p_blank = 0.0
        beams: dict[str, _Hyp] = {"": start}
        for t in range(lp.shape[0]):
            frame = lp[t]
            candidates = np.flatnonzero(frame >= s.token_min_logp)
            if s.token_max and candidates.size > s.token_max:
                candidates = np.sort(candidates[np.argpartition(frame[candidates], -s.token_max)[-s.token_max:]])
            if candidates.size == 0:
                candidates = np.array([int(frame.argmax())])
            if candidates.size == 1 and candidates[0] == blank:
                # a frame that is only blank (about a third of them) extends nothing and moves every hypothesis
                # by the same amount, so the beam and its order stay: update in place, skip the ranking
                p = float(frame[blank])
                for hyp in beams.values():
                    hyp.p_blank, hyp.p_char = _logadd(hyp.p_blank, hyp.p_char) + p, _NEG
                continue
            nxt: dict[str, _Hyp] = {}

            def slot(prefix: str, parent: _Hyp, char: str | None) -> _Hyp:
                hyp = nxt.get(prefix)
                if hyp is None:
                    # the same prefix keeps its LM state (not its probabilities); a longer one extends it
                    hyp = _Hyp(parent.lm, parent.history, parent.word, parent.partial_cost) if char is None \
                        else self._extend(parent, char)
                    nxt[prefix] = hyp
                return hyp

            # plain Python floats: arithmetic on numpy scalars in this inner loop is several times slower
            scored = list(zip(candidates.tolist(), frame[candidates].tolist()))
            for prefix, hyp in beams.items():
                total = _logadd(hyp.p_blank, hyp.p_char)
                last = prefix[-1] if prefix else None
                for k, p in scored:
                    if k == blank:
                        same = slot(prefix, hyp, None)
                        same.p_blank = _logadd(same.p_blank, total + p)
                        continue
                    char = tokens[k]
                    if k == space and (not prefix or last == " "):
                        # a leading or doubled space changes nothing in the text: count it like a blank
                        same = slot(prefix, hyp, None)
                        same.p_blank = _logadd(same.p_blank, total + p)
                        continue
                    if char == last:
                        same = slot(prefix, hyp, None)  # repeat without a blank between: collapses
                        same.p_char = _logadd(same.p_char, hyp.p_char + p)
                        longer = slot(prefix + char, hyp, char)
                        longer.p_char = _logadd(longer.p_char, hyp.p_blank + p)
                    else:
                        longer = slot(prefix + char, hyp, char)
                        longer.p_char = _logadd(longer.p_char, total + p)
            ranked = heapq.nlargest(s.beam_width, ((self._rank(h), prefix, h) for prefix, h in nxt.items()),
                                    key=itemgetter(0))
            floor = ranked[0][0] + s.beam_prune_logp
            beams = {prefix: h for rank, prefix, h in ranked if rank >= floor}
        return self._finish(beams)

    @staticmethod
    def _rank(hyp: _Hyp) -> float:
        return _logadd(hyp.p_blank, hyp.p_char) + hyp.lm + hyp.partial_cost

    def _finish(self, beams: dict[str, _Hyp]) -> str:
        best_text, best_score = "", -math.inf
        for prefix, hyp in beams.items():
            score = _logadd(hyp.p_blank, hyp.p_char) + hyp.lm
            if self.lm is not None:
                history = hyp.history
                if hyp.word:
                    score += self._word_score(history, hyp.word)
                    history = self.lm.next_history(history, hyp.word)
                score += self.settings.alpha * self.lm.score(history, EOS)
            if score > best_score:
                best_text, best_score = prefix, score
        return " ".join(best_text.split())

    def batch(self, log_probs, lengths) -> list[str]:
        """log_probs (B, T', V), lengths (B,) -> B texts."""
        return [self(log_probs[b, : int(n)]) for b, n in enumerate(lengths)]
