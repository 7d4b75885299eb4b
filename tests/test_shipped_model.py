"""The baseline shipped in checkpoints/ loads without a network and hears: key phrases of two bundled clips
(as openai/whisper's tests do with jfk.flac)."""
import json
import os

import pytest

from asr_core.checkpoint import default_model_dir, folder_bytes, read_config
from asr_core.transcribe import Transcriber
from conftest import REPO

CLIPS = REPO / "assets" / "clips"
SHIPPED = REPO / "checkpoints" / "conformer-ctc-whisper-tiny"
# clip -> phrases the shipped model gets right (checked when the checkpoint was made; see MODEL_CARD.md)
KEY_PHRASES = json.loads((CLIPS / "key_phrases.json").read_text()) if (CLIPS / "key_phrases.json").exists() else {}


def test_shipped_checkpoint_is_the_default_and_small():
    assert os.path.samefile(default_model_dir(), SHIPPED)
    assert folder_bytes(str(SHIPPED)) < 60e6
    config = read_config(str(SHIPPED))
    assert config["model"]["subsampling"] == "whisper" and (SHIPPED / "MODEL_CARD.md").exists()


@pytest.mark.parametrize("clip", sorted(KEY_PHRASES))
def test_shipped_model_transcribes_key_phrases(clip):
    text = Transcriber.from_folder(str(SHIPPED)).transcribe(str(CLIPS / clip))
    for phrase in KEY_PHRASES[clip]:
        assert phrase in text, f"{phrase!r} not in {text!r}"


def test_key_phrases_are_pinned():
    assert len(KEY_PHRASES) >= 2
