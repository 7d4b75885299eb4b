import pytest

from asr_core.text import CharTokenizer, normalize_text, number_to_words


@pytest.mark.parametrize("raw,expected", [
    ("HELLO World!", "hello world"),
    ("Don't stop -- it's well-known.", "don't stop it's well known"),
    ("'quoted' words' and 'tis", "quoted words and tis"),
    ("I have 42 cats and 1,000 dogs", "i have forty two cats and one thousand dogs"),
    ("pi is 3.14", "pi is three point one four"),
    ("Café  naïve\tcoöperate", "cafe naive cooperate"),
    ("  ", ""),
    ("rock’n’roll", "rock'n'roll"),
])
def test_normalize(raw, expected):
    assert normalize_text(raw) == expected


def test_numbers():
    assert number_to_words(0) == "zero"
    assert number_to_words(1984) == "one thousand nine hundred eighty four"
    assert number_to_words(2_000_005) == "two million five"


def test_tokenizer_round_trip():
    tok = CharTokenizer()
    assert len(tok) == 29 and tok.tokens[0] == "<blank>"
    ids = tok.encode("Hello, World's END!")
    assert 0 not in ids
    assert tok.decode(ids) == "hello world's end"
    assert CharTokenizer.from_json(tok.to_json()).tokens == tok.tokens
