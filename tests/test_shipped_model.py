"""The baseline shipped in checkpoints/ loads without a network and hears: key phrases of bundled clips (as
openai/whisper's tests do with jfk.flac), greedy and with the word LM that ships beside it."""
import json
import os

import pytest

from asr_core.checkpoint import default_model_dir, folder_bytes, read_config
from asr_core.transcribe import Transcriber
from conftest import REPO

CLIPS = REPO / "assets" / "clips"
SHIPPED = REPO / "checkpoints" / "conformer-ctc-whisper-base"
# clip -> {decoding: phrases the shipped model gets right} (checked when the checkpoint was made; MODEL_CARD.md)
KEY_PHRASES = json.loads((CLIPS / "key_phrases.json").read_text()) if (CLIPS / "key_phrases.json").exists() else {}


def test_shipped_checkpoint_is_the_default_and_small():
    assert os.path.samefile(default_model_dir(), SHIPPED)
    assert folder_bytes(str(SHIPPED)) < 60e6
    config = read_config(str(SHIPPED))
    assert config["model"]["subsampling"] == "whisper" and (SHIPPED / "MODEL_CARD.md").exists()


@pytest.fixture(scope="module")
def transcribers():
    return {"greedy": Transcriber.from_folder(str(SHIPPED), decoding="greedy"),
            "lm": Transcriber.from_folder(str(SHIPPED))}  # the default: the LM in the folder


@pytest.mark.parametrize("clip", sorted(KEY_PHRASES))
def test_shipped_model_transcribes_key_phrases(clip, transcribers):
    for decoding, phrases in KEY_PHRASES[clip].items():
        text = transcribers[decoding].transcribe(str(CLIPS / clip))
        for phrase in phrases:  # whole words: "in his wine" must not pass on "hin his wine"
            assert f" {phrase} " in f" {text} ", f"{decoding}: {phrase!r} not in {text!r}"


def test_the_shipped_lm_is_used_by_default(transcribers):
    from asr_core.beam_search import BeamSearchDecoder

    decoder = transcribers["lm"].decoder
    assert isinstance(decoder, BeamSearchDecoder) and decoder.lm is not None and len(decoder.lm.vocab) > 50_000


def test_key_phrases_are_pinned():
    assert len(KEY_PHRASES) >= 2
