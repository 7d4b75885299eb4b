"""Word n-gram language models: build one (interpolated Kneser-Ney), write/read ARPA, score words.

Why not KenLM: its Python module builds from source and ``lmplz`` is not on PyPI, and pyctcdecode (the usual
CTC + KenLM decoder) pins numpy<2, which conflicts with the rest of the stack. The model here is small (a
trigram over about a million words), so a plain-Python estimator and a dict-based ARPA reader are enough,
and the ARPA file they exchange is the standard one: an LM built with KenLM's ``lmplz`` loads here too.

Estimation follows Chen & Goodman (1998), interpolated Kneser-Ney with one discount per order
``D = n1 / (n1 + 2 n2)``; the highest order may drop n-grams seen fewer than ``min_count`` times, and every
history's back-off weight is then recomputed so that each conditional distribution still sums to one. The
unigram distribution can be mixed with an outside word-frequency prior (e.g. ``wordfreq``), which gives
sensible probabilities to the many words the small training text never saw.
"""
from __future__ import annotations

import gzip
import itertools
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable

from .errors import SettingsError

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG10 = math.log(10.0)
_FLOOR = -99.0  # ARPA's "log10 of zero"


def _ngrams(sentences: Iterable[list[str]], order: int) -> list[Counter]:
    counts = [Counter() for _ in range(order)]
    for words in sentences:
        padded = [BOS, *words, EOS]
        for n in range(1, order + 1):
            table = counts[n - 1]
            for i in range(len(padded) - n + 1):
                gram = tuple(padded[i:i + n])
                if gram != (BOS,):
                    table[gram] += 1
    return counts


def _discount(counts: Counter) -> float:
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    # clamped: a toy corpus without singletons would otherwise give D = 0 and no mass for unseen words
    return min(0.95, max(0.1, n1 / (n1 + 2 * n2))) if n1 + n2 else 0.5


class NGramLM:
    """Back-off word n-gram model in ARPA form: ``probs[n][gram] = log10 p`` and ``backoffs[gram] = log10 bow``."""

    def __init__(self, order: int, probs: list[dict[tuple, float]], backoffs: dict[tuple, float]):
        self.order = order
        self.probs = probs
        self.backoffs = backoffs
        self.vocab = {g[0] for g in probs[0]} - {BOS, EOS, UNK}
        self.unk_log10 = probs[0].get((UNK,), -7.0)

    # ----- scoring -----
    def log10_prob(self, history: tuple[str, ...], word: str) -> float:
        """log10 P(word | history) with back-off; words outside the vocabulary score as <unk>."""
        if word not in self.vocab and word != EOS:
            word = UNK
        history = history[-(self.order - 1):] if self.order > 1 else ()
        penalty = 0.0
        while True:
            gram = (*history, word)
            p = self.probs[len(gram) - 1].get(gram)
            if p is not None:
                return p + penalty
            if not history:
                return self.unk_log10 + penalty
            penalty += self.backoffs.get(history, 0.0)
            history = history[1:]

    def next_history(self, history: tuple[str, ...], word: str) -> tuple[str, ...]:
        """The history after ``word``: the last (order - 1) words, all that the model conditions on."""
        return (*history, word)[-(self.order - 1):] if self.order > 1 else ()

    def score(self, history: tuple[str, ...], word: str) -> float:
        """Natural-log probability (what the decoder adds up)."""
        return self.log10_prob(history, word) * LOG10

    def sentence_log10(self, words: list[str]) -> float:
        history: tuple[str, ...] = (BOS,)
        total = 0.0
        for w in [*words, EOS]:
            total += self.log10_prob(history, w)
            history = self.next_history(history, w)
        return total

    # ----- ARPA -----
    def write_arpa(self, path: str) -> None:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.write("\\data\\\n")
            for n in range(1, self.order + 1):
                f.write(f"ngram {n}={len(self.probs[n - 1])}\n")
            for n in range(1, self.order + 1):
                f.write(f"\n\\{n}-grams:\n")
                for gram, p in sorted(self.probs[n - 1].items()):
                    line = f"{p:.5f}\t{' '.join(gram)}"
                    if n < self.order and gram in self.backoffs:
                        line += f"\t{self.backoffs[gram]:.5f}"
                    f.write(line + "\n")
            f.write("\n\\end\\\n")

    @classmethod
    def read_arpa(cls, path: str) -> "NGramLM":
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                return cls._parse_arpa(path, f)
        except (OSError, UnicodeDecodeError, EOFError) as err:
            raise SettingsError(f"Cannot read language model {path}: {err}") from None
        except ValueError as err:  # a count, order or probability that is not a number, a header without "="
            raise SettingsError(f"{path}: malformed ARPA file ({err})") from None

    @classmethod
    def _parse_arpa(cls, path: str, lines: Iterable[str]) -> "NGramLM":
        # Streamed line by line, and every word interned: a word recurs in thousands of n-grams, and one shared
        # string instead of a copy per n-gram roughly halves the memory of a few-million-n-gram model.
        lines = iter(lines)
        if next(lines, "").strip() != "\\data\\":
            raise SettingsError(f"{path} is not an ARPA language model (it must start with \\data\\)")
        sizes = {}
        line = next(lines, "")
        while not line.strip() and line:  # blank lines before the counts
            line = next(lines, "")
        while line.startswith("ngram "):
            n, count = line[6:].split("=")
            sizes[int(n)] = int(count)
            line = next(lines, "")
        order = max(sizes) if sizes else 0
        if order < 1:
            raise SettingsError(f"{path}: no 'ngram N=' lines in its header")
        probs: list[dict[tuple, float]] = [{} for _ in range(order)]
        backoffs: dict[tuple, float] = {}
        words: dict[str, str] = {}
        n = 0
        for line in itertools.chain([line], lines):  # the line that ended the header comes first
            line = line.strip()
            if not line:
                continue
            if line.startswith("\\") and line.endswith("-grams:"):
                n = int(line[1:line.index("-")])
                continue
            if line.startswith("\\end\\"):
                break
            parts = line.split()
            if n < 1 or len(parts) < n + 1:
                raise SettingsError(f"{path}: malformed line {line[:80]!r}")
            gram = tuple([words.setdefault(w, w) for w in parts[1:n + 1]])
            probs[n - 1][gram] = float(parts[0])
            if len(parts) > n + 1:
                backoffs[gram] = float(parts[n + 1])
        return cls(order, probs, backoffs)


def build_kneser_ney(sentences: list[list[str]], order: int = 3, *, min_count: int = 1,
                     unigram_prior: dict[str, float] | None = None, prior_weight: float = 0.0,
                     unk_log10: float = -7.0) -> NGramLM:
    """Interpolated Kneser-Ney n-gram model over word lists (text already normalised).

    ``unigram_prior`` (word -> relative frequency) adds its words to the vocabulary and is mixed into the
    unigram distribution with weight ``prior_weight``; ``min_count`` prunes the highest order only.
    """
    if order < 1:
        raise SettingsError("order must be at least 1")
    counts = _ngrams(sentences, order)
    # continuation counts N1+(. w...) replace raw counts below the highest order (the Kneser-Ney idea)
    adjusted: list[Counter] = [Counter() for _ in range(order)]
    adjusted[order - 1] = counts[order - 1]
    for n in range(order, 1, -1):
        for gram in counts[n - 1]:
            adjusted[n - 2][gram[1:]] += 1
    for n in range(1, order):  # n-grams starting with <s> have no left context: use their raw counts
        for gram, c in counts[n - 1].items():
            if gram[0] == BOS:
                adjusted[n - 1][gram] = c
    discounts = [_discount(adjusted[n]) for n in range(order)]

    # unigrams: discounted continuation counts + uniform leftover, then mixed with the prior
    uni = adjusted[0]
    total = sum(uni.values())
    vocab = {g[0] for g in uni} | set(unigram_prior or {})
    vocab.discard(BOS)
    d1 = discounts[0]
    leftover = d1 * len(uni) / total
    p1 = {w: max(uni.get((w,), 0) - d1, 0) / total + leftover / len(vocab) for w in vocab}
    if unigram_prior and prior_weight > 0:
        norm = sum(unigram_prior.values())
        p1 = {w: (1 - prior_weight) * p + prior_weight * unigram_prior.get(w, 0.0) / norm for w, p in p1.items()}
    probs: list[dict[tuple, float]] = [{} for _ in range(order)]
    probs[0] = {(w,): math.log10(p) for w, p in p1.items() if p > 0}
    probs[0][(BOS,)] = _FLOOR
    probs[0][(UNK,)] = unk_log10
    interp: list[dict[tuple, float]] = [{(w,): p for w, p in p1.items()}]  # linear probabilities per order

    bows: dict[tuple, float] = {}

    for n in range(2, order + 1):
        table = adjusted[n - 1]
        d = discounts[n - 1]
        by_history: dict[tuple, list[tuple]] = defaultdict(list)
        for gram in table:
            by_history[gram[:-1]].append(gram)
        level = {}
        for history, grams in by_history.items():
            hist_total = sum(table[g] for g in grams)
            gamma = d * len(grams) / hist_total
            for g in grams:
                level[g] = max(table[g] - d, 0) / hist_total + gamma * _backoff_prob(g[1:], interp, bows, p1,
                                                                                     unk_log10)
        interp.append(level)
        # pruning (highest order only), then back-off weights that renormalise each history
        if n == order and min_count > 1:
            level = {g: p for g, p in level.items() if counts[n - 1][g] >= min_count}
            interp[-1] = level
        kept_by_history: dict[tuple, list[tuple]] = defaultdict(list)
        for g in level:
            kept_by_history[g[:-1]].append(g)
        for history in by_history:
            kept = kept_by_history.get(history, [])
            seen_mass = sum(level[g] for g in kept)
            lower_mass = sum(_backoff_prob(g[1:], interp[:-1], bows, p1, unk_log10) for g in kept)
            if lower_mass < 1.0 and seen_mass < 1.0:
                bows[history] = (1.0 - seen_mass) / (1.0 - lower_mass)
        probs[n - 1] = {g: math.log10(p) for g, p in level.items() if p > 0}
    backoffs = {h: math.log10(b) for h, b in bows.items() if b > 0}
    return NGramLM(order, probs, backoffs)


def _backoff_prob(gram: tuple, interp: list[dict[tuple, float]], bows: dict[tuple, float],
                  p1: dict[str, float], unk_log10: float) -> float:
    """P(gram[-1] | gram[:-1]) in back-off form over the orders estimated so far (linear)."""
    weight = 1.0
    while gram:
        n = len(gram)
        if n <= len(interp):
            p = interp[n - 1].get(gram)
            if p is not None:
                return weight * p
        if n == 1:
            break
        weight *= bows.get(gram[:-1], 1.0)
        gram = gram[1:]
    return weight * p1.get(gram[-1], 10 ** unk_log10) if gram else 0.0


def build_from_sources(data: list[str], text_files: list[str], *, order: int = 3, min_count: int = 2,
                       wordfreq_words: int = 0, prior_weight: float = 0.3) -> tuple[NGramLM, int]:
    """A Kneser-Ney LM from the transcripts of data sets (folders or manifests) and plain text files, with the
    ``wordfreq_words`` most frequent English words of the `wordfreq` package as a unigram prior when asked.
    Returns (LM, words of text)."""
    from .data import load_utterances
    from .text import normalize_text

    if not data and not text_files:
        raise SettingsError("give at least one transcript set or text file to build the LM from", setting="data")
    if not 0 <= prior_weight < 1:
        raise SettingsError(f"prior_weight must be in [0, 1), got {prior_weight}", setting="prior_weight")
    sentences = []
    for source in data:
        sentences += [normalize_text(u.text).split() for u in load_utterances(source)]
    for path in text_files:
        if not os.path.exists(path):
            raise SettingsError(f"text file not found: {path}", setting="text")
        with open(path, encoding="utf-8", errors="replace") as f:
            sentences += [normalize_text(line).split() for line in f]
    sentences = [s for s in sentences if s]
    prior = _wordfreq_prior(wordfreq_words) if wordfreq_words else None
    lm = build_kneser_ney(sentences, order, min_count=min_count, unigram_prior=prior,
                          prior_weight=prior_weight if prior else 0.0)
    return lm, sum(len(s) for s in sentences)


def _wordfreq_prior(n: int) -> dict[str, float]:
    try:
        import wordfreq
    except ImportError:
        raise SettingsError("a wordfreq prior needs `pip install wordfreq` (the `train` extra)",
                            setting="wordfreq") from None
    from .text import normalize_text

    words = [normalize_text(w) for w in wordfreq.top_n_list("en", n)]
    return {w: wordfreq.word_frequency(w, "en") for w in words if w and " " not in w}
