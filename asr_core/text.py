"""One text normaliser for everything (training targets, references, hypotheses, WER), and the vocabulary."""
from __future__ import annotations

import json
import re
import unicodedata

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = [(10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"), (100, "hundred")]


def number_to_words(number: int) -> str:
    """0 -> 'zero', 1984 -> 'one thousand nine hundred eighty four' (spoken-form digits, as LibriSpeech writes)."""
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    for scale, name in _SCALES:
        if number >= scale:
            head, rest = divmod(number, scale)
            return number_to_words(head) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


def _spell_number(match: re.Match) -> str:
    digits = match.group(0).replace(",", "")
    whole, _, frac = digits.partition(".")
    words = number_to_words(int(whole)) if len(whole) <= 12 else " ".join(_ONES[int(d)] for d in whole)
    if frac:
        words += " point " + " ".join(_ONES[int(d)] for d in frac)
    return f" {words} "


_ORDINAL_LAST = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                 "nine": "ninth", "twelve": "twelfth"}


def _spell_ordinal(match: re.Match) -> str:
    """"3rd" -> "third", "21st" -> "twenty first" (Whisper writes ordinals in digits; references spell them)."""
    *head, last = number_to_words(int(match.group(1))).split()
    last = _ORDINAL_LAST.get(last) or (last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return " " + " ".join([*head, last]) + " "


def normalize_text(text: str) -> str:
    """Lower-case; numbers and ordinals spelled out; hyphens and dashes to spaces; punctuation removed except apostrophes
    inside words; accents folded to ASCII; whitespace collapsed.

    >>> normalize_text("Don't STOP -- it's 42, well-known 'quotes'!")
    "don't stop it's forty two well known quotes"
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", _spell_ordinal, text)
    text = re.sub(r"\d[\d,]*(\.\d+)?", _spell_number, text)
    text = re.sub(r"[-\u2010-\u2015_/]", " ", text)
    text = re.sub(r"[^a-z' ]", " ", text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)  # apostrophes survive only between letters
    return re.sub(r"\s+", " ", text).strip()


class CharTokenizer:
    """Characters of normalised text, with the CTC blank at index 0.

    Default vocabulary (29): <blank>, space, a-z, apostrophe.
    """

    BLANK = "<blank>"

    def __init__(self, tokens: list[str] | None = None):
        self.tokens = tokens or [self.BLANK, " ", *"abcdefghijklmnopqrstuvwxyz", "'"]
        if self.tokens[0] != self.BLANK:
            raise ValueError("The first token must be the CTC blank.")
        self._index = {t: i for i, t in enumerate(self.tokens)}

    blank_id = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Normalise then map characters to ids; characters outside the vocabulary are dropped."""
        return [self._index[c] for c in normalize_text(text) if c in self._index]

    def decode(self, ids) -> str:
        """Ids (already collapsed, blanks removed) to text."""
        return re.sub(r"\s+", " ", "".join(self.tokens[i] for i in ids if i != self.blank_id)).strip()

    def to_json(self) -> str:
        return json.dumps({"type": "char", "tokens": self.tokens}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CharTokenizer":
        data = json.loads(text)
        if data.get("type") != "char":
            raise ValueError(f"Unknown tokenizer type {data.get('type')!r}")
        return cls(data["tokens"])
