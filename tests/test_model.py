import dataclasses

import pytest
import torch

from asr_core.config import PRESETS, ModelConfig, preset
from asr_core.errors import SettingsError
from asr_core import model as model_module
from asr_core.model import ConformerCTC, close_blocks, count_parameters, key_bias, subsampled_lengths


@pytest.mark.parametrize("name", ["tiny", "whisper-tiny"])
def test_padded_batch_equals_each_utterance_alone(name):
    torch.manual_seed(0)
    model = ConformerCTC(preset(name, dropout=0.0)).eval()
    lengths = [301, 157, 88]
    feats = [torch.randn(n, 80) for n in lengths]
    batch = torch.zeros(3, max(lengths), 80)
    for i, f in enumerate(feats):
        batch[i, : len(f)] = f
    batch[1, 157:] = 7.0  # garbage in the padding must not matter
    with torch.no_grad():
        out, out_lengths = model(batch, torch.tensor(lengths))
        for i, f in enumerate(feats):
            alone, n = model(f[None], torch.tensor([len(f)]))
            assert out_lengths[i] == n[0] == alone.shape[1]
            torch.testing.assert_close(out[i, : n[0]], alone[0], atol=2e-5, rtol=1e-4)


def test_the_float_key_bias_attends_exactly_as_a_boolean_mask(monkeypatch):
    """The exported graph's float mask must not change a single output against torch's boolean-mask path."""
    torch.manual_seed(1)
    model = ConformerCTC(preset("tiny", dropout=0.0, transformer_layers=1)).eval()
    feats, lengths = torch.randn(3, 260, 80), torch.tensor([260, 141, 33])
    with torch.no_grad():
        with_bias, n = model(feats, lengths)
        monkeypatch.setattr(model_module, "key_bias", lambda key_mask, dtype: key_mask)
        with_bool, _ = model(feats, lengths)
    for i, length in enumerate(n.tolist()):
        assert torch.equal(with_bias[i, :length], with_bool[i, :length])
    bias = key_bias(torch.tensor([[True, False], [False, False]]), torch.float16)
    assert bias.dtype == torch.float16 and bias[0, 0] == 0 and torch.isfinite(bias).all()
    assert bias[0, 1] == bias[1, 0] == torch.finfo(torch.float16).min


@pytest.mark.parametrize("name,factor", [("tiny", 4), ("whisper-tiny", 2)])
def test_output_lengths_follow_subsampling_formula(name, factor):
    model = ConformerCTC(preset(name)).eval()
    for n in (1, 2, 3, 4, 5, 99, 100, 101, 1000):
        expected = n
        for _ in range({4: 2, 2: 1}[factor]):
            expected = (expected - 1) // 2 + 1  # conv kernel 3, stride 2, padding 1
        with torch.no_grad():
            out, lengths = model(torch.randn(1, n, 80), torch.tensor([n]))
        assert out.shape[1] == lengths[0] == expected
    assert subsampled_lengths(torch.tensor([1000]), 2).item() == 250


def test_presets_parameter_counts():
    counts = {name: count_parameters(ConformerCTC(preset(name))) for name in ("xs", "s", "m")}
    assert 1.5e6 < counts["xs"] < 3e6
    assert 7e6 < counts["s"] < 13e6
    assert 25e6 < counts["m"] < 36e6
    assert set(PRESETS) >= {"xs", "s", "m", "whisper-tiny", "whisper-base"}


def test_config_validation_and_round_trip():
    cfg = preset("s")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SettingsError):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(SettingsError):
        preset("huge")
    with pytest.raises(SettingsError):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_exportable_with_torch_export():
    model = ConformerCTC(preset("tiny")).eval()
    feats, lengths = torch.randn(2, 200, 80), torch.tensor([200, 120])
    # export traces a dynamic time axis in multiples of 4 frames (callers pad; lengths carry the real sizes)
    time = 4 * torch.export.Dim("time4", min=4, max=750)
    exported = torch.export.export(model, (feats, lengths), dynamic_shapes=({1: time}, None))
    other = torch.randn(2, 332, 80), torch.tensor([330, 100])
    torch.testing.assert_close(exported.module()(*other)[0], model(*other)[0], atol=1e-5, rtol=1e-4)


def test_grown_model_computes_what_the_smaller_one_did():
    """train --layers N+2 --init-from an N-block folder: the donor's weights load, the two new blocks start with
    every residual branch closed, so the grown model's output equals the donor's exactly until training moves it.
    Blocks that end in a LayerNorm cannot be identity and are left alone (0 closed)."""
    torch.manual_seed(0)
    small_cfg = preset("tiny", dropout=0.0, block_final_norm=False)
    small = ConformerCTC(small_cfg).eval()
    grown = ConformerCTC(dataclasses.replace(small_cfg, n_layers=small_cfg.n_layers + 2)).eval()
    missing = grown.load_state_dict(small.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith((f"blocks.{small_cfg.n_layers}.", f"blocks.{small_cfg.n_layers + 1}."))
                           for k in missing)
    feats, lengths = torch.randn(2, 120, small_cfg.features.n_mels), torch.tensor([120, 90])
    assert close_blocks(grown, small_cfg.n_layers) == 2
    with torch.no_grad():
        expected, grown_out = small(feats, lengths)[0], grown(feats, lengths)[0]
    assert torch.allclose(expected, grown_out, atol=1e-6)
    assert close_blocks(ConformerCTC(preset("tiny", block_final_norm=True)), 1) == 0
