"""Word n-gram LM: Kneser-Ney distributions sum to one, ARPA round trip, hand-computed back-off, bad files."""
import random

import pytest

from asr_core.errors import SettingsError
from asr_core.lm import BOS, EOS, NGramLM, build_kneser_ney


def toy_sentences(n=300, seed=0):
    rng = random.Random(seed)
    words = "the cat sat on a mat dog ran to house big small red".split()
    # a little structure: "the" is mostly followed by a noun
    out = []
    for _ in range(n):
        s = [rng.choice(words) for _ in range(rng.randint(3, 9))]
        out.append(["the", rng.choice(["cat", "dog", "mat"]), *s])
    return out


@pytest.mark.parametrize("order,min_count,prior", [(2, 1, None), (3, 1, None), (3, 2, {"zebra": 1.0, "the": 2.0}),
                                                   (4, 3, {"zebra": 1.0})])
def test_every_history_is_a_distribution(order, min_count, prior):
    lm = build_kneser_ney(toy_sentences(), order, min_count=min_count, unigram_prior=prior,
                          prior_weight=0.2 if prior else 0.0)
    targets = sorted(lm.vocab) + [EOS]
    for history in [(), (BOS,), ("the",), ("the", "cat"), (BOS, "the"), ("zebra", "red"), ("red", "red", "on")]:
        total = sum(10 ** lm.log10_prob(history, w) for w in targets)
        assert total == pytest.approx(1.0, abs=1e-6), history
    if prior:
        assert "zebra" in lm.vocab  # the prior's words join the vocabulary
    # structure is learnt: a sentence starting "the" goes on with a noun far more often
    assert lm.log10_prob((BOS, "the"), "cat") > lm.log10_prob((BOS, "the"), "on") + 0.5


def test_arpa_round_trip(tmp_path):
    lm = build_kneser_ney(toy_sentences(), 3, min_count=2)
    for name in ("lm.arpa", "lm.arpa.gz"):
        path = str(tmp_path / name)
        lm.write_arpa(path)
        again = NGramLM.read_arpa(path)
        assert again.order == 3 and again.vocab == lm.vocab
        for history, word in [((BOS,), "the"), (("the", "cat"), "sat"), (("red",), "zebra"), (("on", "a"), EOS)]:
            assert again.log10_prob(history, word) == pytest.approx(lm.log10_prob(history, word), abs=1e-4)


def test_back_off_arithmetic_on_a_hand_written_arpa(tmp_path):
    path = tmp_path / "hand.arpa"
    path.write_text("\\data\\\nngram 1=4\nngram 2=1\n\n\\1-grams:\n-1.0\t<s>\t-0.5\n-0.5\ta\t-0.3\n-0.7\tb\n"
                    "-0.9\t</s>\n\n\\2-grams:\n-0.2\ta b\n\n\\end\\\n")
    lm = NGramLM.read_arpa(str(path))
    assert lm.log10_prob(("a",), "b") == pytest.approx(-0.2)  # listed bigram
    assert lm.log10_prob(("a",), EOS) == pytest.approx(-0.3 - 0.9)  # back-off weight of "a" + unigram
    assert lm.log10_prob(("b",), "a") == pytest.approx(-0.5)  # "b" has no back-off weight: 0
    assert lm.log10_prob(("a",), "never-seen") == pytest.approx(-0.3 + lm.unk_log10)


def test_bad_files_are_clear_errors(tmp_path):
    not_arpa = tmp_path / "x.arpa"
    not_arpa.write_text("hello world\n")
    with pytest.raises(SettingsError, match="not an ARPA"):
        NGramLM.read_arpa(str(not_arpa))
    broken = tmp_path / "y.arpa.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(SettingsError, match="Cannot read"):
        NGramLM.read_arpa(str(broken))
