"""The console script end to end: evaluate and transcribe run, bad input exits non-zero with one line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
import soundfile as sf

from conftest import REPO


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edge_asr", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_evaluate_writes_the_json(tiny_model_dir, dev_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = run("evaluate", "--model", tiny_model_dir, "--data", str(dev_dir / "1272"), "--limit", "3",
                 "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    for key in ("wer", "cer", "substitutions", "deletions", "insertions", "n_utterances", "audio_seconds",
                "wall_seconds", "rtf", "latency_ms_median", "latency_ms_p90", "threads", "params",
                "bytes_on_disk", "utterances"):
        assert key in data
    assert data["n_utterances"] == 3 and data["threads"] == 1 and data["wer"] >= 0
    assert set(data["utterances"][0]) == {"id", "reference", "hypothesis"}


def test_transcribe_files_and_bad_input(tiny_model_dir, wav_file, tmp_path):
    result = run("transcribe", "--model", tiny_model_dir, wav_file, "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.splitlines()[0])
    assert row["file"] == wav_file and isinstance(row["text"], str)

    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.int16), 16000)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("hello")
    stereo8k = tmp_path / "stereo8k.wav"
    sf.write(stereo8k, np.stack([np.sin(np.arange(16000) / 5)] * 2, axis=1) * 0.3, 8000)
    result = run("transcribe", "--model", tiny_model_dir, str(silent), str(not_audio), str(stereo8k),
                 str(tmp_path / "missing.wav"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "silent" in result.stderr and "Failed to load audio" in result.stderr and "No such audio" in result.stderr
    assert str(stereo8k) in result.stdout  # the good file was still transcribed


def test_errors_are_one_line(tmp_path):
    result = run("transcribe", "--model", str(tmp_path / "nope"), "x.wav")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("edge-asr: error:") and "Traceback" not in result.stderr
    result = run("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "--max-steps" in result.stderr


def test_make_manifest(dev_dir, tmp_path):
    out = tmp_path / "dev.jsonl"
    result = run("make-manifest", str(dev_dir / "1272"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all({"audio_filepath", "text", "duration"} <= set(r) for r in rows)


def test_build_lm_then_evaluate_with_it(tiny_model_dir, dev_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Chapter one. The cat sat on the mat!\nA dog ran to the house; it was big.\n")
    result = run("build-lm", "--data", str(dev_dir / "1272"), "--text", str(corpus), "--order", "3",
                 "--out", str(model / "lm.arpa.gz"))
    assert result.returncode == 0, result.stderr
    assert "vocabulary" in result.stderr and (model / "lm.arpa.gz").stat().st_size > 0
    out = tmp_path / "eval.json"
    result = run("evaluate", "--model", str(model), "--data", str(dev_dir / "1272"), "--limit", "2",
                 "--threads", "1", "--beam-width", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["decoding"] == "beam search + LM" and set(data["greedy"]) == {"wer", "cer"}
    clip = dev_dir / "1272" / "135031" / "1272-135031-0000.opus"
    greedy = run("transcribe", "--model", str(model), "--decoding", "greedy", str(clip))
    assert greedy.returncode == 0, greedy.stderr
    bad = run("build-lm", "--out", str(tmp_path / "x.arpa"))
    assert bad.returncode == 2 and "at least one" in bad.stderr
    bad = run("evaluate", "--model", str(model), "--data", str(dev_dir / "1272"), "--alpha", "-3")
    assert bad.returncode == 2 and "alpha" in bad.stderr
    bad = run("transcribe", "--model", str(model), "--unk-penalty", "-1", str(clip))
    assert bad.returncode == 2 and "unknown-word penalty" in bad.stderr
    bad = run("transcribe", "--model", str(model), "--blank-penalty", "20", str(clip))
    assert bad.returncode == 2 and "blank penalty" in bad.stderr
    bad = run("transcribe", "--model", str(model), "--temperature", "0", str(clip))
    assert bad.returncode == 2 and "temperature" in bad.stderr
    strict = run("transcribe", "--model", str(model), "--unk-penalty", "50", "--blank-penalty", "1",
                 "--temperature", "1.5", "--beam-width", "4", str(clip))
    assert strict.returncode == 0, strict.stderr


def test_wise_ft_writes_a_complete_model_folder(tiny_en_finetuned_dir, tmp_path):
    from asr_core.checkpoint import load_model, read_config
    from asr_core.provenance import read_provenance

    source = tiny_en_finetuned_dir  # fp16, with an LM and decoding.json that must travel to the output
    out = tmp_path / "wise"
    result = run("wise-ft", "--model", str(source), "--weight", "0.5", "--lower-weight", "0.6", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {"model.safetensors", "config.json", "vocab.json", "lm.arpa.gz", "decoding.json"} <= \
        {p.name for p in out.iterdir()}
    record = read_provenance(read_config(str(out)))
    assert record.kind == "wise-ft" and record.details["weight"] == 0.5 and record.details["lower_weight"] == 0.6
    assert record.parents[0]["folder"] == str(source) and record.parents[0]["provenance"]["kind"] == "train"
    assert record.metrics == {}  # nothing measured on the new weights yet: the parent's dev WER is not theirs
    source_bytes = os.path.getsize(source / "model.safetensors")
    assert (out / "model.safetensors").stat().st_size < 1.01 * source_bytes  # fp16 as the source, not fp32
    model, _ = load_model(str(out))
    assert next(model.parameters()).dtype == torch.float32  # stored fp16 like its source, loads as fp32
    bad = run("wise-ft", "--model", str(source), "--weight", "2", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr
    (out / "compression.json").write_text("{}")  # a compressed artifact is refused, not half-interpolated
    bad = run("wise-ft", "--model", str(out), "--weight", "0.1", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "compressed artifact" in bad.stderr


def test_average_writes_the_weighted_mean_of_two_models(tmp_path):
    """edge-asr average A B --weights 3 1: every float tensor is 0.75 A + 0.25 B (weights normalised), stored in
    fp16 only when both inputs were; the provenance is in config.json. Models of another shape, a weight per model
    missing, or --out equal to an input are refused before anything is written."""
    from asr_core.checkpoint import load_model, read_config, save_model
    from asr_core.config import preset
    from asr_core.provenance import read_provenance
    from asr_core.model import ConformerCTC
    from asr_core.text import CharTokenizer

    torch.manual_seed(0)
    a, b = ConformerCTC(preset("tiny")), ConformerCTC(preset("tiny"))
    save_model(str(tmp_path / "a"), a, CharTokenizer())
    save_model(str(tmp_path / "b"), b, CharTokenizer())
    result = run("average", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "3", "1",
                 "--out", str(tmp_path / "ab"))
    assert result.returncode == 0, result.stderr
    mean, _ = load_model(str(tmp_path / "ab"))
    expected = {k: 0.75 * a.state_dict()[k] + 0.25 * b.state_dict()[k] for k in a.state_dict()}
    assert all(torch.allclose(v, expected[k], atol=1e-6) for k, v in mean.state_dict().items())
    assert not all(torch.allclose(v, a.state_dict()[k]) for k, v in mean.state_dict().items())
    record = read_provenance(read_config(str(tmp_path / "ab")))
    assert record.kind == "average" and record.details["weights"] == [0.75, 0.25]
    assert [p["folder"] for p in record.parents] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert [p["weight"] for p in record.parents] == [0.75, 0.25]
    from safetensors.torch import load_file
    assert all(v.dtype == torch.float32 for v in load_file(str(tmp_path / "ab" / "model.safetensors")).values())
    save_model(str(tmp_path / "a16"), a, CharTokenizer(), half=True)
    save_model(str(tmp_path / "b16"), b, CharTokenizer(), half=True)
    assert run("average", str(tmp_path / "a16"), str(tmp_path / "b16"), "--out", str(tmp_path / "ab16")).returncode == 0
    assert all(v.dtype == torch.float16 for v in load_file(str(tmp_path / "ab16" / "model.safetensors")).values())
    save_model(str(tmp_path / "c"), ConformerCTC(preset("tiny", n_layers=1)), CharTokenizer())
    bad = run("average", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "ac"))
    assert bad.returncode == 2 and "another shape" in bad.stderr and not (tmp_path / "ac").exists()
    bad = run("average", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "one non-negative weight per model" in bad.stderr
    bad = run("average", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "a"))
    assert bad.returncode == 2 and "new folder" in bad.stderr


def test_train_refuses_to_drop_blocks_of_the_model_it_continues(tmp_path):
    """--init-from an 8-block model folder with a 6-block preset would silently lose the top blocks."""
    result = run("train", "--data", str(REPO / "assets" / "clips" / "manifest.jsonl"), "--out", str(tmp_path / "r"),
                 "--preset", "whisper-base", "--init-from", "checkpoints/conformer-ctc-whisper-base",
                 "--max-steps", "1")
    assert result.returncode == 2 and "--layers" in result.stderr and "8 blocks" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_train_int8_frozen_stores_the_frozen_part_as_int8_and_average_keeps_it(tmp_path):
    """train --freeze-layers 1 --int8-frozen: the stem and block 0 are rounded before training, never move, and
    are written as int8 codes; the rest is trained and stored as usual. average keeps that storage (the frozen
    part is identical in both, so the mean of the codes' values is the same values). Without --freeze-layers the
    flag is refused."""
    from safetensors.torch import load_file

    from asr_core.checkpoint import INT8_SCALE, load_model

    data = str(REPO / "assets" / "clips" / "manifest.jsonl")
    base = ["train", "--data", data, "--preset", "tiny", "--max-steps", "2", "--batch-seconds", "30",
            "--no-spec-augment", "--threads", "1"]
    bad = run(*base, "--out", str(tmp_path / "x"), "--int8-frozen")
    assert bad.returncode == 2 and "--int8-frozen" in bad.stderr and "freeze_layers" in bad.stderr, bad.stderr
    for name, lr in (("a", "1e-3"), ("b", "3e-3")):  # one seed (one start), two learning rates
        result = run(*base, "--out", str(tmp_path / name), "--freeze-layers", "1", "--int8-frozen", "--lr", lr)
        assert result.returncode == 0, result.stderr
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a["blocks.0.attn.q_proj.weight"].dtype == torch.int8 and "blocks.0.attn.q_proj.weight" + INT8_SCALE in a
    assert a["blocks.1.attn.q_proj.weight"].dtype == torch.float32
    assert torch.equal(a["blocks.0.attn.q_proj.weight"], b["blocks.0.attn.q_proj.weight"])  # frozen
    assert not torch.equal(a["head.weight"], b["head.weight"])  # trained
    result = run("average", str(tmp_path / "a" / "last"), str(tmp_path / "b" / "last"), "--out", str(tmp_path / "ab"))
    assert result.returncode == 0, result.stderr
    ab = load_file(str(tmp_path / "ab" / "model.safetensors"))
    assert torch.equal(ab["blocks.0.attn.q_proj.weight"], a["blocks.0.attn.q_proj.weight"])
    mean, _ = load_model(str(tmp_path / "ab"))
    assert mean.cfg.int8_stored_layers == 1
    # --int8-layers: the trained block 1 rounded to int8 too; inputs differing only in that storage still average
    result = run("average", str(tmp_path / "ab"), "--int8-layers", "2", "--out", str(tmp_path / "ab2"))
    assert result.returncode == 0 and "stored" in result.stderr, result.stderr
    ab2 = load_file(str(tmp_path / "ab2" / "model.safetensors"))
    assert ab2["blocks.1.attn.q_proj.weight"].dtype == torch.int8
    assert torch.equal(ab2["blocks.0.attn.q_proj.weight"], ab["blocks.0.attn.q_proj.weight"])
    stored, _ = load_model(str(tmp_path / "ab2"))
    q = stored.state_dict()["blocks.1.attn.q_proj.weight"]
    assert stored.cfg.int8_stored_layers == 2 and not torch.equal(q, mean.state_dict()["blocks.1.attn.q_proj.weight"])
    assert torch.allclose(q, mean.state_dict()["blocks.1.attn.q_proj.weight"], atol=q.abs().max().item() / 200)
    result = run("average", str(tmp_path / "ab2"), str(tmp_path / "a" / "last"), "--out", str(tmp_path / "mixed"))
    assert result.returncode == 0, result.stderr
    assert load_model(str(tmp_path / "mixed"))[0].cfg.int8_stored_layers == 2  # the first model's storage
    bad = run("average", str(tmp_path / "ab"), "--out", str(tmp_path / "one"))
    assert bad.returncode == 2 and "--int8-layers" in bad.stderr
    bad = run("average", str(tmp_path / "ab"), "--int8-layers", "9", "--out", str(tmp_path / "nine"))
    assert bad.returncode == 2 and "int8_stored_layers" in bad.stderr and not (tmp_path / "nine").exists()


def test_compress_calibrates_on_any_audio_and_distills(tiny_model_dir, tmp_path):
    from conftest import speechlike

    audio = tmp_path / "calib"
    audio.mkdir()
    for i in range(5):
        sf.write(audio / f"clip{i}.wav", speechlike(1.5, seed=i), 16000)
    (audio / "broken.wav").write_text("not audio")  # skipped, not fatal
    out = tmp_path / "int4"
    result = run("compress", "--model", tiny_model_dir, "--recipe", "int4:group=32", "--calib", str(audio),
                 "--out", str(out), "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "calibration: 5 utterances" in result.stdout
    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["calibration"]["utterances"] == 5 and manifest["recipe"]["steps"][0]["algo"] == "gptq"
    from asr_core.checkpoint import provenance_matches_weights, read_config
    from asr_core.provenance import read_provenance
    record = read_provenance(read_config(str(out)))  # the artifact says what made it, from which parent
    assert record.kind == "compress" and record.details["recipe"].startswith("int4") and "--calib" in record.command
    assert record.parents[0]["folder"] == tiny_model_dir  # (the tiny fixture model has no record of its own)
    assert provenance_matches_weights(str(out)) is True
    out = tmp_path / "structured"
    result = run("compress", "--model", tiny_model_dir, "--recipe", "structured:fraction=0.25", "--calib", str(audio),
                 "--finetune-steps", "2", "--distill", "--distill-hidden", "0.5", "--batch-seconds", "10",
                 "--out", str(out), "--threads", "1")
    assert result.returncode == 0, result.stderr
    tuned = json.loads((out / "compression.json").read_text())["finetune"]
    assert tuned["distill"] and tuned["steps"] == 2 and tuned["data"] == str(audio) and tuned["hidden_weight"] == 0.5
    for flags, message in ((["--distill-hidden", "1"], "needs --distill"),
                           (["--finetune-steps", "2", "--distill", "--distill-hidden", "-1"], ">= 0")):
        bad = run("compress", "--model", tiny_model_dir, "--recipe", "int4", "--out", str(tmp_path / "x"), *flags)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    for flags, message in ((["--calib", str(tmp_path / "int4")], "No readable audio"),
                           (["--calib", str(audio), "--calib-utterances", "2"], "at least 4"),
                           (["--calib", str(tmp_path / "missing")], "not found")):
        bad = run("compress", "--model", tiny_model_dir, "--recipe", "int4", "--out", str(tmp_path / "x"), *flags)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
