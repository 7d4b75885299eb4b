"""The torch-free runner (asr_core.lite): numpy front-end, windows, decoders on numpy, and a run without torch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e \".[onnx]\")")
pytest.importorskip("onnx", reason="onnx is not installed (pip install -e \".[onnx]\")")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install -e \".[onnx]\")")

from conftest import REPO, speechlike  # noqa: E402

from asr_core import features, features_np  # noqa: E402
from asr_core.beam_search import BeamSearchDecoder, BeamSettings  # noqa: E402
from asr_core.config import FeatureConfig  # noqa: E402
from asr_core.decoding import GreedyDecoder  # noqa: E402
from asr_core.lite import LiteTranscriber, make_decoder, windows  # noqa: E402
from asr_core.lm import build_kneser_ney  # noqa: E402
from asr_core.onnx_model import load_onnx_model  # noqa: E402
from asr_core.text import CharTokenizer  # noqa: E402
from asr_core.transcribe import Transcriber  # noqa: E402
from compression.export import export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def lite_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model exported, with a small word LM beside it so that --decoding lm has one."""
    out = tmp_path_factory.mktemp("lite") / "onnx"
    export_onnx(tiny_model_dir, str(out), check=False)
    build_kneser_ney([["the", "cat", "sat"], ["a", "dog", "ran"]], 2).write_arpa(str(out / "lm.arpa.gz"))
    BeamSettings(beam_width=8).to_file(str(out / "decoding.json"))
    return str(out)


@pytest.mark.parametrize("normalize", ["whisper", "meanvar", "none"])
@pytest.mark.parametrize("scale", ["slaney", "htk"])
def test_numpy_log_mel_matches_torch(normalize, scale):
    cfg = FeatureConfig(normalize=normalize, mel_scale=scale)
    for n in (1600, 16037, 64000):
        samples = speechlike(n / 16000, seed=n)
        expected = features.log_mel(samples, cfg).numpy()
        got = features_np.log_mel(samples, cfg)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() < 1e-4
    assert np.array_equal(features_np.mel_filterbank(16000, 400, 80, 0.0, None, scale),
                          features.mel_filterbank(16000, 400, 80, 0.0, None, scale).numpy())


def test_windows_cover_the_clip_like_the_transcriber(lite_dir):
    model, tokenizer = load_onnx_model(lite_dir, threads=1)
    samples = speechlike(41.3, seed=4)
    lite = LiteTranscriber(model, tokenizer, chunk_seconds=12.0, context_seconds=2.5)
    torch_side = Transcriber(model, tokenizer, chunk_seconds=12.0, context_seconds=2.5)
    got, expected = lite.log_probs(samples), torch_side.log_probs(samples).numpy()
    # 12 s windows stepping by 7 s over 41.3 s
    assert len(windows(len(samples), lite.chunk, lite.context, lite.samples_per_frame)) == 6
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
    assert windows(16000, lite.chunk, lite.context, 640) == [(0, 16000, 0, -1)]


def test_decoders_take_numpy_and_torch_alike():
    tok = CharTokenizer()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(80, len(tok))) * 4
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    greedy = GreedyDecoder(tok)
    assert greedy(lp.astype(np.float32)) == greedy(torch.from_numpy(lp).float())
    assert greedy.batch(lp[None], np.array([40])) == greedy.batch(torch.from_numpy(lp)[None], torch.tensor([40]))
    beam = BeamSearchDecoder(tok, build_kneser_ney([["hello", "world"]], 2), BeamSettings(beam_width=8))
    assert beam(lp.astype(np.float32)) == beam(torch.from_numpy(lp).float())


def test_make_decoder_picks_the_folder_lm(lite_dir, tiny_model_dir):
    tok = CharTokenizer()
    assert isinstance(make_decoder(tok, lite_dir, "auto"), BeamSearchDecoder)
    assert isinstance(make_decoder(tok, lite_dir, "greedy"), GreedyDecoder)
    assert isinstance(make_decoder(tok, tiny_model_dir, "auto"), GreedyDecoder)


def _no_torch_env(tmp_path):
    """PYTHONPATH with a ``torch`` package that refuses to import: any torch import in the runner fails."""
    stub = tmp_path / "no_torch" / "torch"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text("raise ImportError('torch is not available on this device')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "no_torch"), str(REPO)])
    return env


def test_lite_runs_without_torch_and_agrees_with_the_torch_side(lite_dir, tmp_path):
    files = []
    for i, seconds in enumerate((3.0, 34.0)):  # the second one takes two 30 s windows
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, speechlike(seconds, seed=10 + i), 16000)
        files.append(str(path))
    model, tokenizer = load_onnx_model(lite_dir, threads=1)
    for decoding in ("greedy", "lm"):
        transcriber = Transcriber(model, tokenizer, decoder=make_decoder(tokenizer, lite_dir, decoding))
        expected = [transcriber.transcribe(f) for f in files]
        assert any(expected)  # a random model still spells something: an empty text would prove little
        run = subprocess.run(
            [sys.executable, "-c", "import sys, asr_core.lite as l; rc = l.main(); "
             "assert 'torch' not in sys.modules or sys.modules['torch'] is None; sys.exit(rc)",
             "--model", lite_dir, "--threads", "1", "--decoding", decoding, "--json", *files],
            env=_no_torch_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        got = [json.loads(line)["text"] for line in run.stdout.splitlines()]
        assert got == expected


def test_lite_reports_bad_files_and_folders(lite_dir, tmp_path):
    env = _no_torch_env(tmp_path)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF nonsense")
    run = subprocess.run([sys.executable, "-m", "asr_core.lite", "--model", lite_dir, str(bad)], env=env,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 1 and "bad.wav" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "asr_core.lite", "--model", str(tmp_path), str(bad)], env=env,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 2 and "config.json" in run.stderr and "Traceback" not in run.stderr


def test_memory_is_measured_in_a_fresh_process(lite_dir, tiny_model_dir):
    from asr_core.errors import SettingsError
    from asr_core.memory import peak_rss_mb

    onnx_side = peak_rss_mb(lite_dir, runtime="onnx", threads=1)
    assert onnx_side["hwm_reset"] and not onnx_side["torch_imported"]  # the lite path stays torch-free
    assert 0 < onnx_side["load_mb"] <= onnx_side["peak_mb"] and onnx_side["baseline_mb"] > 0
    torch_side = peak_rss_mb(tiny_model_dir, runtime="torch", threads=1)
    assert torch_side["torch_imported"] and torch_side["baseline_mb"] > onnx_side["baseline_mb"]
    assert torch_side["text"] == onnx_side["text"]  # the same clip through the same weights
    with pytest.raises(SettingsError, match="runtime must be"):
        peak_rss_mb(lite_dir, runtime="tflite")
    with pytest.raises(SettingsError, match="took over 0.01 s and was stopped"):
        peak_rss_mb(lite_dir, runtime="onnx", timeout=0.01)
