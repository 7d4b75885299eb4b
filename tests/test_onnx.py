"""ONNX export (compression.export) and the ONNX Runtime model (asr_core.onnx_model), on tiny random models."""
import json
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e \".[onnx]\")")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e \".[onnx]\")")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install -e \".[onnx]\")")

from asr_core.config import preset  # noqa: E402
from asr_core.errors import CheckpointError, SettingsError  # noqa: E402
from asr_core.model import ConformerCTC  # noqa: E402
from asr_core.onnx_model import OnnxCTC, is_onnx_folder, load_onnx_model  # noqa: E402
from asr_core.text import CharTokenizer  # noqa: E402
from compression.artifact import load_artifact, save_artifact  # noqa: E402
from compression.compress import apply_recipe  # noqa: E402
from compression.export import artifact_codes, export_onnx, pack_nbits  # noqa: E402
from compression.recipe import parse_recipe  # noqa: E402


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("onnx") / "fp32")
    return out, export_onnx(tiny_model_dir, out)


def _artifact(model, folder, recipe):
    parsed = parse_recipe(recipe)
    save_artifact(apply_recipe(model, parsed), str(folder), CharTokenizer(), parsed.to_json())
    return str(folder)


@pytest.fixture(scope="module")
def mixed_model():
    """Block 0 a plain Transformer block, block 1 a Conformer block (as the shipped model)."""
    torch.manual_seed(3)
    return ConformerCTC(preset("tiny", dropout=0.0, transformer_layers=1)).eval()


def _features(frames, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 80, generator=gen), torch.tensor([frames])


def _op_counts(path):
    counts = {}
    for node in onnx.load(path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_fp32_export_matches_torch_at_any_length(onnx_dir, tiny_model):
    folder, info = onnx_dir
    model, tokenizer = load_onnx_model(folder, threads=1)
    for frames in (37, 300, 1234):  # the frame axis is dynamic
        feats, lengths = _features(frames, seed=frames)
        with torch.inference_mode():
            expected, expected_lengths = tiny_model(feats, lengths)
        got, got_lengths = model(feats, lengths)
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape
        assert torch.equal(got_lengths, expected_lengths)
        assert (got - expected).abs().max() < 1e-4
    assert info["weights"] == {"int8": 0, "int4": 0, "fp32": 22} and info["max_abs_diff"] < 1e-4
    fp32_bytes = 4 * sum(p.numel() for p in tiny_model.parameters())  # a few norms fold into constants
    assert 0.98 * fp32_bytes < info["weight_bytes"]["float32"] <= 1.01 * fp32_bytes
    assert "IsNaN" not in _op_counts(os.path.join(folder, "model.onnx"))  # a float attention mask: no NaN guard
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["format"] == "edge-asr-onnx" and config["onnx"]["quantize"] == "none"
    assert config["model"]["features"]["n_mels"] == 80 and model.cfg == tiny_model.cfg
    assert tokenizer.tokens == CharTokenizer().tokens and is_onnx_folder(folder)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_model.parameters())


def test_batches_and_numpy_inputs(onnx_dir, tiny_model):
    model, _ = load_onnx_model(onnx_dir[0], threads=1)
    feats = torch.randn(2, 240, 80)
    lengths = torch.tensor([240, 170])
    with torch.inference_mode():
        expected, expected_lengths = tiny_model(feats, lengths)
    got, got_lengths = model(feats, lengths)
    assert torch.equal(got_lengths, expected_lengths)
    for b, n in enumerate(expected_lengths.tolist()):
        assert (got[b, :n] - expected[b, :n]).abs().max() < 1e-4
    lp, out = model(feats[:1].numpy(), np.array([240]))
    assert isinstance(lp, np.ndarray) and out.tolist() == [60]


def test_transcriber_runs_on_the_onnx_model(onnx_dir, tiny_model, tiny_model_dir):
    from asr_core.transcribe import Transcriber
    from conftest import speechlike

    model, tokenizer = load_onnx_model(onnx_dir[0], threads=1)
    samples = speechlike(2.0)
    a = Transcriber(model, tokenizer).log_probs(samples)
    b = Transcriber(tiny_model, tokenizer).log_probs(samples)
    assert (a - b).abs().max() < 1e-4


def test_int4_artifact_keeps_its_own_codes(mixed_model, tmp_path):
    folder = _artifact(mixed_model, tmp_path / "int4", "int4:group=32,algo=rtn")
    info = export_onnx(folder, str(tmp_path / "int4_onnx"))
    ops = _op_counts(str(tmp_path / "int4_onnx" / "model.onnx"))
    # every Linear but the head (skipped by default) runs as MatMulNBits; subsampling.conv2 is a convolution
    assert ops.get("MatMulNBits") == info["weights"]["int4"] == 17 and info["weights"]["fp32"] == 1
    assert info["quantize"] == "artifact" and info["dequantized"] == {"int4-as-fp32": 1}
    # the packed codes: half a byte a weight, plus one fp32 scale per group of 32
    q4_weights = sum(m.weight.numel() for name, m in mixed_model.named_modules()
                     if isinstance(m, torch.nn.Linear) and name != "head")
    assert info["weight_bytes"]["uint8"] == q4_weights // 2
    feats, lengths = _features(300)
    with torch.inference_mode():
        expected = load_artifact(folder)(feats, lengths)[0]
    got = OnnxCTC(str(tmp_path / "int4_onnx"), threads=1)(feats, lengths)[0]
    assert (got - expected).abs().max() < 1e-4  # fp32 compute on the same 4-bit grid: no second rounding


def test_nbits_packing_layout():
    codes = np.array([[-8, 7, 0, 1] + [0] * 12 + [3]], dtype=np.int8)  # K = 17: two blocks of 16, padded
    packed = pack_nbits(codes, 16)
    assert packed.shape == (1, 2, 8)
    assert packed[0, 0, 0] == (0 | (15 << 4)) and packed[0, 0, 1] == (8 | (9 << 4))
    assert packed[0, 1, 0] == (11 | (8 << 4)) and packed[0, 1, 1] == (8 | (8 << 4))  # padding stores code 0


@pytest.mark.parametrize("weights", ["s8", "u8"])
def test_int8_artifact_exports_its_codes_and_scales(mixed_model, tmp_path, weights):
    """The artifact's own int8 codes go into model.onnx unchanged, as int8 (s8) or shifted into uint8 with zero
    point 128 (u8). Each is checked against torch where its kernel is exact: u8 everywhere, s8 where the CPU has
    an int8 dot product (on x86 without VNNI ONNX Runtime's u8 x s8 kernel saturates: 0.48 off here)."""
    from asr_core.onnx_model import has_int8_dot_product

    folder = _artifact(mixed_model, tmp_path / "int8", "int8:algo=gptq")
    out = str(tmp_path / "int8_onnx")
    info = export_onnx(folder, out, int8_weights=weights)
    assert info["int8_weights"] == weights and json.loads((tmp_path / "int8_onnx" / "config.json").read_text())[
        "onnx"]["int8_weights"] == weights
    proto = onnx.load(os.path.join(out, "model.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in proto.graph.node) == info["weights"]["int8"] == 17
    from compression.artifact import read_manifest
    from asr_core.checkpoint import read_weights

    entry = read_manifest(folder)["layers"]["blocks.1.ffn1.linear1"]
    packed = {k.split(".weight.")[1]: v for k, v in read_weights(folder).items()
              if k.startswith("blocks.1.ffn1.linear1.weight.")}
    codes, scales = artifact_codes(packed, entry)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    dtype, offset = (np.uint8, 128) if weights == "u8" else (np.int8, 0)
    stored = [name for name, v in inits.items() if name.endswith("_int8") and v.shape == codes.T.shape
              and v.dtype == dtype and np.array_equal(v.astype(np.int16) - offset, codes.T)]
    assert len(stored) == 1  # GPTQ's clipped scales: ORT's own rounding would not give these codes
    zero = inits[stored[0] + "_zp"]
    assert np.array_equal(inits[stored[0] + "_scale"], scales) and zero.dtype == dtype and (zero == offset).all()
    if weights == "s8" and has_int8_dot_product() is False:
        return  # the saturating kernel: not this CPU's exact form (test_auto_int8_weights_follow_the_cpu)
    feats, lengths = _features(300)
    with torch.inference_mode():
        expected = load_artifact(folder)(feats, lengths)[0]
    got = OnnxCTC(out, threads=1)(feats, lengths)[0]
    assert (got - expected).abs().max() < 0.1  # both quantize activations at run time, each its own way


def test_auto_int8_weights_follow_the_cpu(mixed_model, tmp_path, monkeypatch):
    """auto: u8 on x86 without VNNI, s8 where the CPU has an int8 dot product or cannot tell; an s8 folder
    loaded on a CPU without one warns, naming the fix; a wrong choice is a SettingsError."""
    import asr_core.onnx_model as onnx_model
    from compression.export import int8_weight_type

    for probe, expected in ((False, "u8"), (True, "s8"), (None, "s8")):
        monkeypatch.setattr(onnx_model, "has_int8_dot_product", lambda probe=probe: probe)
        assert int8_weight_type("auto") == expected and int8_weight_type("u8") == "u8"
    with pytest.raises(SettingsError, match="int8 weights must be one of auto, s8, u8"):
        int8_weight_type("s4")
    folder = _artifact(mixed_model, tmp_path / "int8", "int8:algo=rtn")
    export_onnx(folder, str(tmp_path / "s8"), int8_weights="s8", check=False)
    monkeypatch.setattr(onnx_model, "has_int8_dot_product", lambda: False)
    with pytest.warns(UserWarning, match="--int8-weights u8"):
        OnnxCTC(str(tmp_path / "s8"), threads=1)
    monkeypatch.setattr(onnx_model, "has_int8_dot_product", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OnnxCTC(str(tmp_path / "s8"), threads=1)


def _one_int8_product(weights: str, rows: int = 6, k: int = 32, n: int = 8):
    """A graph computing A (1, rows, k) @ W (k, n) through the exporter's int8 pattern, and its W codes/scales."""
    from onnx import TensorProto, helper, numpy_helper

    from compression.export import _int8_nodes

    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    scales = rng.uniform(0.01, 0.02, size=n).astype(np.float32)
    matmul = helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")
    nodes, inits = _int8_nodes(helper, numpy_helper, matmul, "W", codes, scales, set(), weights)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, rows, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, rows, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), codes, scales


def test_per_row_activations_round_each_frame_on_its_own_scale():
    """The per-row rewrite computes, in ORT with its fusions on, exactly the symmetric per-row int8 product
    (checked against numpy), and on frames of very different loudness it is closer to the float product than
    the per-tensor quantizer (one scale for all frames) that it replaces."""
    from compression.export import per_row_activations

    a = np.random.default_rng(1).standard_normal((1, 6, 32)).astype(np.float32)
    a[0, 2] *= 40.0  # one loud frame
    results = {}
    for kind in ("per-tensor", "per-row"):
        proto, codes, scales = _one_int8_product("u8")
        if kind == "per-row":
            assert per_row_activations(proto) == 1
            assert not any(n.op_type == "DynamicQuantizeLinear" for n in proto.graph.node)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        results[kind] = session.run(None, {"A": a})[0]
    row_scale = np.abs(a).max(axis=-1, keepdims=True) / np.float32(127)
    a_q = np.clip(np.round(a / row_scale), -128, 127)  # round half to even, as QuantizeLinear
    expected = (a_q @ codes.T.astype(np.float64)) * row_scale * scales
    assert np.allclose(results["per-row"], expected, rtol=1e-5, atol=1e-4)
    exact = a.astype(np.float64) @ (codes.T * scales).astype(np.float64)
    quiet = [0, 1, 3, 4, 5]
    error = {k: np.abs(v - exact)[0, quiet].max() for k, v in results.items()}
    assert error["per-row"] < 0.2 * error["per-tensor"]


def test_per_row_export_runs_the_artifact(mixed_model, tmp_path):
    folder = _artifact(mixed_model, tmp_path / "int8", "int8:algo=rtn")
    info = export_onnx(folder, str(tmp_path / "row"), int8_weights="u8", activations="per-row")
    assert info["activations"] == "per-row"
    proto = onnx.load(str(tmp_path / "row" / "model.onnx"))
    assert not any(n.op_type == "DynamicQuantizeLinear" for n in proto.graph.node)
    feats, lengths = _features(300)
    with torch.inference_mode():
        expected = load_artifact(folder)(feats, lengths)[0]
    got = OnnxCTC(str(tmp_path / "row"), threads=1)(feats, lengths)[0]
    assert (got - expected).abs().max() < 0.1
    with pytest.raises(SettingsError, match="activations must be one of auto, per-tensor, per-row"):
        export_onnx(folder, str(tmp_path / "x"), activations="per-channel")
    assert "activations" not in export_onnx(folder, str(tmp_path / "plain"), int8_weights="u8", check=False)


def test_auto_activations_follow_the_artifacts_int8_layers(mixed_model, tmp_path):
    """An int8:algo=gptq artifact rounds activations per row in torch, so "auto" exports it per row, and the two
    runtimes then compute the same product (up to float rounding at ties); rtn's stays per-tensor."""
    from compression.quantize import int_mm_is_exact

    folder = _artifact(mixed_model, tmp_path / "gptq", "int8:algo=gptq")
    info = export_onnx(folder, str(tmp_path / "gptq_onnx"), int8_weights="u8", check=False)
    assert info["activations"] == "per-row"
    rtn = _artifact(mixed_model, tmp_path / "rtn", "int8:algo=rtn")
    assert "activations" not in export_onnx(rtn, str(tmp_path / "rtn_onnx"), int8_weights="u8", check=False)
    if not int_mm_is_exact():
        return  # torch falls back to one scale per call here: the runtimes differ by design
    feats, lengths = _features(300)
    with torch.inference_mode():
        expected = load_artifact(folder)(feats, lengths)[0]
    got = OnnxCTC(str(tmp_path / "gptq_onnx"), threads=1)(feats, lengths)[0]
    assert (got - expected).abs().max() < 0.02


def test_ort_quantizers_on_a_trained_checkpoint(tiny_model_dir, onnx_dir, tmp_path):
    fp32_bytes = onnx_dir[1]["bytes"]
    for kind, op in (("int8", "MatMulInteger"), ("int4", "MatMulNBits")):
        info = export_onnx(tiny_model_dir, str(tmp_path / kind), quantize=kind)
        assert info["weights"][kind] == 22 and info["weights"]["fp32"] == 0
        assert _op_counts(str(tmp_path / kind / "model.onnx")).get(op) == 22
        assert info["bytes"] < 0.6 * fp32_bytes and info["max_abs_diff"] < 1.0


def test_lm_files_travel(tiny_model_dir, tmp_path):
    from asr_core.lm import build_kneser_ney

    source = tmp_path / "with_lm"
    shutil.copytree(tiny_model_dir, source)
    build_kneser_ney([["hello", "world"]], 2).write_arpa(str(source / "lm.arpa.gz"))
    (source / "decoding.json").write_text(json.dumps({"beam_width": 4}))
    export_onnx(str(source), str(tmp_path / "out"), check=False)
    assert (tmp_path / "out" / "lm.arpa.gz").read_bytes() == (source / "lm.arpa.gz").read_bytes()
    assert (tmp_path / "out" / "decoding.json").exists()


def test_export_errors(tiny_model_dir, mixed_model, tmp_path, onnx_dir, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model folder"):
        export_onnx(str(tmp_path / "empty"), str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="not found"):
        export_onnx(str(tmp_path / "missing"), str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="already an ONNX"):
        export_onnx(onnx_dir[0], str(tmp_path / "x"))
    with pytest.raises(SettingsError, match="opset 11 is not supported"):
        export_onnx(tiny_model_dir, str(tmp_path / "x"), opset=11)
    with pytest.raises(SettingsError, match="use 18 to 22"):  # 23's Attention op does not run in ORT's CPU kernel
        export_onnx(tiny_model_dir, str(tmp_path / "x"), opset=23)
    with pytest.raises(SettingsError, match="quantize must be"):
        export_onnx(tiny_model_dir, str(tmp_path / "x"), quantize="int2")
    artifact = _artifact(mixed_model, tmp_path / "art", "int8:algo=rtn")
    with pytest.raises(SettingsError, match="its own codes"):
        export_onnx(artifact, str(tmp_path / "x"), quantize="int8")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(SettingsError, match=r'pip install -e "\.\[onnx\]"'):
        export_onnx(tiny_model_dir, str(tmp_path / "x"))
    with pytest.raises(SettingsError, match=r'pip install -e "\.\[onnx\]"'):
        load_onnx_model(onnx_dir[0])
    assert not os.path.exists(tmp_path / "x" / "model.onnx")


def test_truncated_or_corrupt_model_is_one_clear_error(onnx_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(onnx_dir[0], folder)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_onnx_model(str(folder))
    assert "\n" not in str(err.value)
    (folder / "model.onnx").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_onnx_model(str(folder))
    os.remove(folder / "model.onnx")
    assert not is_onnx_folder(str(folder))
    with pytest.raises(CheckpointError, match="no model.onnx"):
        load_onnx_model(str(folder))


def test_load_model_opens_onnx_folders(onnx_dir):
    from asr_core import checkpoint

    if "onnx" not in getattr(checkpoint, "format_loaders", dict)():
        pytest.skip("this install registers no ONNX loader (edge_asr.model_formats entry point)")
    model, tokenizer = checkpoint.load_model(onnx_dir[0], threads=1)
    assert isinstance(model, OnnxCTC) and model.threads == 1 and len(tokenizer) == model.cfg.vocab_size


@pytest.mark.parametrize("recipe, weights, extra", [
    ("prune:sparsity=0.5,algo=magnitude+kmeans:clusters=16,algo=lloyd+int8:algo=rtn",
     {"int8": 17, "int4": 0, "fp32": 1},
     {"int8_requantized": {"kmeans": 17}, "dequantized": {"kmeans": 1}}),
    ("ternary:algo=rtn", {"int8": 0, "int4": 0, "fp32": 18}, {"dequantized": {"ternary": 18}}),
    ("svd:rank=8+int8:algo=rtn", {"int8": 34, "int4": 0, "fp32": 1}, {"lowrank": 17}),
])
def test_other_encodings_compute_what_the_torch_artifact_computes(mixed_model, tmp_path, recipe, weights, extra):
    folder = _artifact(mixed_model, tmp_path / "art", recipe)
    info = export_onnx(folder, str(tmp_path / "onnx"), check=False)
    assert info["weights"] == weights and all(info[k] == v for k, v in extra.items())
    feats, lengths = _features(300)
    with torch.inference_mode():
        expected = load_artifact(folder)(feats, lengths)[0]
    got = OnnxCTC(str(tmp_path / "onnx"), threads=1)(feats, lengths)[0]
    # fp32 layers: float rounding only; int8 layers: each runtime quantizes activations its own way
    assert (got - expected).abs().max() < (1e-4 if weights["int8"] == 0 else 0.1)


def test_latency_script_takes_folders_relative_to_the_caller(onnx_dir):
    """scripts/onnx_latency.py times each model in a child process run from the repository: a folder named
    relative to the caller's directory must still be found there."""
    import subprocess

    from conftest import REPO

    folder = onnx_dir[0]
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "onnx_latency.py"), os.path.basename(folder),
                          "--runs", "1", "--rounds", "1", "--threads", "1"],
                         cwd=os.path.dirname(folder), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    line = run.stdout.strip().splitlines()[-1]
    assert "failed" not in line and line.startswith(os.path.basename(folder)) and "x (" in line
