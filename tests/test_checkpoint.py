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


def test_int8_stored_layers_store_the_stem_and_first_blocks_as_int8(tmp_path):
    """cfg.int8_stored_layers = 1: the stem's and block 0's matrices are written as int8 codes + fp16 scales (about
    a quarter of their fp32 bytes) and load as exactly what round_to_int8_storage makes of them; everything else
    is unchanged. Saving the loaded model again writes the same tensors (no second rounding); int8=False writes
    floats; a scale without its codes is a clear error."""
    from safetensors.torch import load_file, save_file

    from asr_core.checkpoint import INT8_SCALE, int8_stored_names, round_to_int8_storage

    torch.manual_seed(0)
    model = ConformerCTC(preset("tiny", dropout=0.0, int8_stored_layers=1)).eval()
    names = int8_stored_names(model)
    assert "subsampling.conv1.weight" in names and "blocks.0.ffn1.linear1.weight" in names
    assert not any(n.startswith("blocks.1.") or n.endswith(".bias") for n in names)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(str(tmp_path / "a"), model, CharTokenizer())
    stored = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert all(stored[n].dtype == torch.int8 and stored[n + INT8_SCALE].dtype == torch.float16 for n in names)
    assert stored["blocks.1.ffn1.linear1.weight"].dtype == torch.float32
    assert round_to_int8_storage(model) == len(names)  # what the file holds, in memory
    loaded, _ = load_model(str(tmp_path / "a"))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
        if k in names:  # really rounded: close to the original, not equal
            assert not torch.equal(v, original[k]) and torch.allclose(v, original[k], atol=original[k].abs().max() / 200)
        else:
            assert torch.equal(v, original[k]), k
    save_model(str(tmp_path / "b"), loaded, CharTokenizer())
    again = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert stored.keys() == again.keys() and all(torch.equal(stored[k], again[k]) for k in stored)
    save_model(str(tmp_path / "h"), loaded, CharTokenizer(), half=True)  # fp16 for the rest: the same codes
    halved = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert all(torch.equal(halved[n], stored[n]) and torch.equal(halved[n + INT8_SCALE], stored[n + INT8_SCALE])
               for n in names)
    save_model(str(tmp_path / "f"), loaded, CharTokenizer(), int8=False)
    assert all(v.dtype == torch.float32 for v in load_file(str(tmp_path / "f" / "model.safetensors")).values())
    del stored[names[0]]
    save_file(stored, str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no int8 tensor"):
        load_model(str(tmp_path / "a"))
