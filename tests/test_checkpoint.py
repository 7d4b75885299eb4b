import json
import os

import pytest
import torch

from asr_core.checkpoint import load_model, save_model
from asr_core.config import preset
from asr_core.errors import CheckpointError
from asr_core.model import ConformerCTC
from asr_core.text import CharTokenizer


def test_round_trip_gives_identical_outputs(tmp_path, tiny_model):
    save_model(str(tmp_path), tiny_model, CharTokenizer())
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "vocab.json"]
    model, tok = load_model(str(tmp_path))
    x, n = torch.randn(1, 120, 80), torch.tensor([120])
    with torch.no_grad():
        torch.testing.assert_close(model(x, n)[0], tiny_model(x, n)[0])
    assert tok.tokens == CharTokenizer().tokens and model.cfg == tiny_model.cfg


def test_half_precision_halves_the_weights(tmp_path, tiny_model):
    save_model(str(tmp_path / "f32"), tiny_model, CharTokenizer())
    save_model(str(tmp_path / "f16"), tiny_model, CharTokenizer(), half=True)
    size = lambda d: os.path.getsize(tmp_path / d / "model.safetensors")
    assert size("f16") < 0.55 * size("f32")
    model, _ = load_model(str(tmp_path / "f16"))
    assert next(model.parameters()).dtype == torch.float32


def test_clear_errors(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    folder = tmp_path / "m"
    save_model(str(folder), tiny_model, CharTokenizer())
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(str(folder))
    save_model(str(folder), tiny_model, CharTokenizer())
    config = json.loads((folder / "config.json").read_text())
    config["model"]["d_model"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(str(folder))
    (folder / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(str(folder))


def test_loading_never_unpickles(tmp_path, tiny_model):
    """A pickle disguised as weights is rejected, not executed."""
    folder = tmp_path / "evil"
    save_model(str(folder), tiny_model, CharTokenizer())
    torch.save({"x": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError):
        load_model(str(folder))
