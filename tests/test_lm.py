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


def test_reader_tolerates_blank_lines_and_shares_word_strings(tmp_path):
    # a blank line after \\data\\ (some writers put one) and CRLF line ends still parse
    path = tmp_path / "blank.arpa"
    path.write_text("\\data\\\r\n\r\nngram 1=3\r\nngram 2=2\r\n\r\n\\1-grams:\r\n-1.0\t<s>\t-0.5\r\n-0.5\tword\t-0.3\r\n"
                    "-0.9\t</s>\r\n\r\n\\2-grams:\r\n-0.2\t<s> word\r\n-0.1\tword </s>\r\n\r\n\\end\\\r\n")
    lm = NGramLM.read_arpa(str(path))
    assert lm.order == 2 and lm.log10_prob((BOS,), "word") == pytest.approx(-0.2)
    # one string object per word, however many n-grams it is in: what keeps a large LM's memory down
    (unigram,) = [g for g in lm.probs[0] if g == ("word",)]
    assert all(g[-1] is unigram[0] or g[0] is unigram[0] for g in lm.probs[1])
    # no blank line between the counts and the first section; a bad number or order is a clear error
    tight = tmp_path / "tight.arpa"
    tight.write_text("\\data\\\nngram 1=2\n\\1-grams:\n-0.5\tword\n-0.9\t</s>\n\\end\\\n")
    assert NGramLM.read_arpa(str(tight)).log10_prob((), "word") == pytest.approx(-0.5)
    for bad in ("-0.5x\tword", "-0.5\tword\tnot-a-number"):
        broken = tmp_path / "bad.arpa"
        broken.write_text(f"\\data\\\nngram 1=1\n\n\\1-grams:\n{bad}\n\\end\\\n")
        with pytest.raises(SettingsError, match="malformed"):
            NGramLM.read_arpa(str(broken))
    broken.write_text("\\data\\\nngram 1=many\n\n\\1-grams:\n-0.5\tword\n\\end\\\n")  # a bad count in the header
    with pytest.raises(SettingsError, match="malformed"):
        NGramLM.read_arpa(str(broken))


def test_bad_files_are_clear_errors(tmp_path):
    not_arpa = tmp_path / "x.arpa"
    not_arpa.write_text("hello world\n")
    with pytest.raises(SettingsError, match="not an ARPA"):
        NGramLM.read_arpa(str(not_arpa))
    broken = tmp_path / "y.arpa.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(SettingsError, match="Cannot read"):
        NGramLM.read_arpa(str(broken))


def test_lm_corpus_script_reads_unpacked_sources(tmp_path):
    """scripts/lm_corpus.py on a fake unpacked-package folder: book text split into sentences, the NLTK Bible
    left out (the KJV is its own source), a source with no files reported instead of failing."""
    import gzip
    import subprocess
    import sys

    from conftest import REPO
    books = tmp_path / "src" / "gutenberg" / "package" / "gutenberg"
    books.mkdir(parents=True)
    (books / "austen-emma.txt").write_text("[Emma by Jane Austen 1816]\n\nEmma Woodhouse, handsome,\nclever, "
                                           "and rich.  She was happy; truly.  Yes!")
    (books / "bible-kjv.txt").write_text("In the beginning God created the heaven and the earth.")
    speeches = tmp_path / "src" / "sotu" / "package" / "data"
    speeches.mkdir(parents=True)
    (speeches / "1790_george_washington_n.txt").write_text("Fellow-Citizens of the Senate: I embrace with great "
                                                          "satisfaction the opportunity.")
    devil = tmp_path / "src" / "devil" / "usr" / "share" / "dictd"
    devil.mkdir(parents=True)
    with gzip.open(devil / "devil.dict.dz", "wt") as f:
        f.write("ABSURDITY, n. A statement or belief manifestly inconsistent with one's own opinion.")
    out = tmp_path / "corpus.txt"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "lm_corpus.py"), "--folder", str(tmp_path / "src"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = out.read_text().splitlines()
    assert "[Emma by Jane Austen 1816] Emma Woodhouse, handsome, clever, and rich." in lines
    assert "She was happy;" in lines and "truly." not in lines and "Yes!" not in lines  # one word: no n-gram
    assert not any("beginning" in line for line in lines)
    assert "Fellow-Citizens of the Senate:" in lines
    assert any(line.startswith("ABSURDITY, n.") for line in lines)
