"""The two halves of a GPU call's 64 MiB journeys (scripts/gpu/prepare_gpu_bundle.py out, scripts/gpu/gpu_pick_export.py
back): the int8 transport copy keeps the frozen part's codes bit for bit, and an export that leaves out what is
unchanged since INIT is made whole again, exactly, here."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asr_core.checkpoint import INT8_SCALE, load_model, save_model
from asr_core.config import preset
from asr_core.model import ConformerCTC
from asr_core.text import CharTokenizer

SCRIPTS = Path(__file__).resolve().parent  # the scripts this folder holds, beside this test


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def trained_folder(tmp_path) -> str:
    """A 2-block model stored as a training run stores it: block 0 frozen in int8, block 1 fp16."""
    torch.manual_seed(0)
    model = ConformerCTC(preset("tiny", dropout=0.0, n_layers=2, int8_stored_layers=1)).eval()
    folder = str(tmp_path / "trained")
    save_model(folder, model, CharTokenizer(), half=True)
    return folder


def test_transport_copy_is_smaller_keeps_frozen_codes_and_stays_close(tmp_path, trained_folder):
    prepare = script("prepare_gpu_bundle")
    out = str(tmp_path / "init-continue")
    prepare.write_transport_copy(trained_folder, out)
    before, after = load_file(f"{trained_folder}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert os.path.getsize(f"{out}/model.safetensors") < 0.8 * os.path.getsize(f"{trained_folder}/model.safetensors")
    frozen = [k for k, v in before.items() if v.dtype == torch.int8]
    assert frozen and all(torch.equal(before[k], after[k]) and torch.equal(before[k + INT8_SCALE],
                                                                          after[k + INT8_SCALE]) for k in frozen)
    name = "blocks.1.ffn1.linear1.weight"  # trained: fp16 before, int8 codes for the journey
    assert before[name].dtype == torch.float16 and after[name].dtype == torch.int8
    original, _ = load_model(trained_folder)
    copy, _ = load_model(out)
    assert copy.cfg.int8_stored_layers == 2
    x, n = torch.randn(1, 200, 80), torch.tensor([200])
    with torch.no_grad():
        a, b = original(x, n)[0], copy(x, n)[0]
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05 * a.abs().max().item())


def test_delta_export_leaves_out_what_init_holds_and_fill_restores_it(tmp_path, trained_folder):
    pick = script("gpu_pick_export")
    model, tokenizer = load_model(trained_folder)
    with torch.no_grad():  # "training": block 1 and the head change, the frozen block 0 does not
        for name, p in model.named_parameters():
            if not name.startswith(("subsampling.", "blocks.0.")):
                p.add_(0.01)
    run = str(tmp_path / "run_best")
    save_model(run, model, tokenizer, half=True)
    delta = str(tmp_path / "export")
    pick.export_half(run, delta, {"selection": {"wer": 0.3}}, delta_from=trained_folder)
    sent = load_file(f"{delta}/model.safetensors")
    assert "blocks.1.ffn1.linear1.weight" in sent and "blocks.0.ffn1.linear1.weight" not in sent
    assert os.path.getsize(f"{delta}/model.safetensors") < 0.8 * os.path.getsize(f"{run}/model.safetensors")
    whole = str(tmp_path / "whole")
    pick.fill(delta, whole)
    expected, restored = load_file(f"{run}/model.safetensors"), load_file(f"{whole}/model.safetensors")
    assert expected.keys() == restored.keys() and all(torch.equal(expected[k], restored[k]) for k in expected)
    loaded, _ = load_model(whole)
    assert loaded.cfg == model.cfg
    with pytest.raises(SystemExit, match="whole model already"):
        pick.fill(whole, str(tmp_path / "again"))
    with pytest.raises(SystemExit, match="not the run's INIT"):
        other = str(tmp_path / "other")
        save_model(other, ConformerCTC(preset("tiny", n_layers=2)), tokenizer)  # no int8 codes to take
        pick.fill(delta, str(tmp_path / "wrong"), base=other)
