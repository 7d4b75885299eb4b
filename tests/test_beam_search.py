"""CTC prefix beam search: sums paths that collapse to one text, agrees with greedy on clear input, lets a word
LM correct an acoustically likelier misspelling, and is picked up from a model folder."""
import math

import pytest
import torch

from asr_core.beam_search import DECODING_FILE, LM_FILE, BeamSearchDecoder, BeamSettings
from asr_core.decoding import GreedyDecoder
from asr_core.errors import SettingsError
from asr_core.lm import build_kneser_ney
from asr_core.text import CharTokenizer
from asr_core.transcribe import Transcriber

TOK = CharTokenizer()


def frames(*rows):
    """Each row: {char or '_' (blank): probability}; the rest of the mass spread thinly."""
    lp = torch.full((len(rows), len(TOK)), math.log(1e-6))
    for t, row in enumerate(rows):
        for char, p in row.items():
            lp[t, 0 if char == "_" else TOK.tokens.index(char)] = math.log(p)
    return torch.log_softmax(lp, dim=-1)


def spell(text, p=0.9):
    """Clear frames for ``text`` with blanks between characters."""
    rows = []
    for c in text:
        rows += [{c: p, "_": 1 - p}, {"_": p, c: 1 - p}]
    return rows


def test_sums_paths_where_greedy_takes_the_single_best_one():
    lp = frames({"a": 0.4, "_": 0.6}, {"a": 0.4, "_": 0.6})
    assert GreedyDecoder(TOK)(lp) == ""  # best path: blank blank (0.36)
    assert BeamSearchDecoder(TOK)(lp) == "a"  # "a" = aa + a_ + _a = 0.64


def test_agrees_with_greedy_on_clear_input():
    lp = frames(*spell("hello world"), *spell("  "), *spell("abba"))
    assert BeamSearchDecoder(TOK)(lp) == GreedyDecoder(TOK)(lp) == "hello world abba"


def test_word_lm_corrects_a_misspelling():
    rows = spell("the ")
    rows += [{"k": 0.55, "c": 0.45}, {"_": 0.9}, *spell("at")]
    lp = frames(*rows)
    assert GreedyDecoder(TOK)(lp) == "the kat"
    lm = build_kneser_ney([["the", "cat"], ["a", "cat", "sat"], ["the", "dog"]] * 5, 2)
    assert BeamSearchDecoder(TOK, lm, BeamSettings(alpha=1.0, beta=0.0))(lp) == "the cat"
    assert BeamSearchDecoder(TOK, None)(lp) == "the kat"  # without the LM the acoustics win


def test_unknown_word_penalty_keeps_the_output_in_the_vocabulary():
    # the acoustics clearly say "the cap"; "cap" is not a word the LM knows, "cat" is
    rows = spell("the ca") + [{"p": 0.999, "t": 0.001}, {"_": 0.9}]
    lp = frames(*rows)
    lm = build_kneser_ney([["the", "cat"], ["a", "cat", "sat"], ["the", "dog"]] * 5, 2)
    plain = BeamSearchDecoder(TOK, lm, BeamSettings(alpha=0.3, beta=0.0))
    assert plain(lp) == "the cap"  # shallow fusion alone: the unknown word's cost is smaller than the acoustics'
    strict = BeamSearchDecoder(TOK, lm, BeamSettings(alpha=0.3, beta=0.0, unk_penalty=10.0))
    assert strict(lp) == "the cat"
    with pytest.raises(SettingsError):
        BeamSettings(unk_penalty=-1).validate()


def test_blank_penalty_lets_a_weak_character_through():
    # the middle "o" is heard, but blank is likelier in its only frame: greedy and the plain search drop it
    rows = spell("do", p=0.99) + [{"_": 0.6, "o": 0.4}] + spell("r", p=0.99)
    lp = frames(*rows)
    assert BeamSearchDecoder(TOK)(lp) == "dor"
    assert BeamSearchDecoder(TOK, None, BeamSettings(blank_penalty=2.0))(lp) == "door"
    with pytest.raises(SettingsError):
        BeamSettings(blank_penalty=-0.5).validate()


def test_settings_are_checked(tmp_path):
    with pytest.raises(SettingsError):
        BeamSettings(beam_width=0).validate()
    with pytest.raises(SettingsError):
        BeamSettings(alpha=-1).validate()
    BeamSettings(beam_width=8, alpha=0.3, beta=1.0).to_file(str(tmp_path / DECODING_FILE), tuned_on="x")
    assert BeamSettings.from_file(str(tmp_path / DECODING_FILE)).beam_width == 8


def test_transcriber_uses_the_lm_shipped_in_the_model_folder(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "with_lm"
    shutil.copytree(tiny_model_dir, folder)
    assert isinstance(Transcriber.from_folder(str(folder)).decoder, GreedyDecoder)
    build_kneser_ney([["hello", "world"]], 2).write_arpa(str(folder / LM_FILE))
    BeamSettings(beam_width=4).to_file(str(folder / DECODING_FILE))
    auto = Transcriber.from_folder(str(folder))
    assert isinstance(auto.decoder, BeamSearchDecoder) and auto.decoder.settings.beam_width == 4
    assert isinstance(Transcriber.from_folder(str(folder), decoding="greedy").decoder, GreedyDecoder)
    with pytest.raises(SettingsError, match="no language model"):
        Transcriber.from_folder(tiny_model_dir, decoding="lm")
    assert isinstance(auto.transcribe(torch.zeros(16000).numpy()), str)


def test_empty_and_all_blank_input_give_empty_text():
    lm = build_kneser_ney([["a", "b"]], 2)
    for decoder in (BeamSearchDecoder(TOK), BeamSearchDecoder(TOK, lm)):
        assert decoder(torch.zeros(0, len(TOK))) == ""
        assert decoder(frames({"_": 1.0}, {"_": 1.0})) == ""


def test_temperature_lets_the_lm_overrule_an_over_confident_model():
    """An over-confident model hears "cap": the "t" has 1e-4 in its frame (ln = -9.2, below token_min_logp -8, so
    never tried) and the LM cannot reach "cat"; at temperature 3 the frame is flat enough that it can.
    The frames themselves are unchanged by the setting (the decoder works on its own copy)."""
    rows = spell("the ", p=0.99) + spell("ca", p=0.99) + [{"p": 1 - 1e-4, "t": 1e-4}] + spell(" ", p=0.99)
    lp = frames(*rows)
    before = lp.clone()
    lm = build_kneser_ney([["the", "cat"], ["a", "cat", "sat"], ["the", "dog"]] * 5, 2)
    assert BeamSearchDecoder(TOK, lm, BeamSettings(alpha=0.3, beta=0.0))(lp) == "the cap"
    assert BeamSearchDecoder(TOK, lm, BeamSettings(alpha=0.3, beta=0.0, temperature=3.0))(lp) == "the cat"
    assert torch.equal(lp, before)
    with pytest.raises(SettingsError):
        BeamSettings(temperature=0).validate()


def test_token_cap_bounds_the_search_on_flat_frames():
    """``token_max`` tries only the likeliest tokens of a frame: with 1 the search follows the best token of every
    frame, which is greedy decoding, where the uncapped search sums paths to another text; a cap as large as the
    vocabulary changes nothing."""
    lp = frames({"a": 0.4, "_": 0.6}, {"a": 0.4, "_": 0.6})
    assert BeamSearchDecoder(TOK, settings=BeamSettings(token_max=1))(lp) == GreedyDecoder(TOK)(lp) == ""
    torch.manual_seed(0)
    flat = torch.log_softmax(torch.randn(40, len(TOK)), dim=-1)  # a damaged model: every token plausible
    capped = BeamSearchDecoder(TOK, settings=BeamSettings(token_max=1))(flat)
    assert capped == GreedyDecoder(TOK)(flat)
    assert BeamSearchDecoder(TOK, settings=BeamSettings(token_max=len(TOK)))(flat) == BeamSearchDecoder(TOK)(flat)
    with pytest.raises(SettingsError):
        BeamSettings(token_max=-1).validate()
