"""Every subcommand, given a bad argument, ends with one line naming the problem and a non-zero exit: never a
traceback (the one-line-error contract of edge_asr.main). Driven in-process, so each case takes milliseconds
once the modules are imported."""
import pytest

import edge_asr

MISSING = "missing/folder"  # relative to a fresh temporary working directory: nothing is ever there

CASES = {
    "train": ["train", "--data", MISSING, "--out", MISSING + "/run", "--max-steps", "1"],
    "train-speeds": ["train", "--data", MISSING, "--out", MISSING, "--max-steps", "1", "--speed-perturb", "a,b"],
    "evaluate": ["evaluate", "--model", MISSING, "--data", MISSING],
    "transcribe": ["transcribe", "--model", MISSING, "clip.wav"],
    "build-lm": ["build-lm", "--out", MISSING + ".arpa", "--text", MISSING],
    "wise-ft": ["wise-ft", "--model", MISSING, "--weight", "0.5", "--out", MISSING + "-out"],
    "average": ["average", MISSING, "--out", MISSING + "-avg"],
    "make-manifest": ["make-manifest", MISSING, "--out", MISSING + ".jsonl"],
    "listen": ["listen", "--window", "-1"],
    "compress": ["compress", "--recipe", "bogus:knob=1", "--out", MISSING],
    "compress-knob": ["compress", "--recipe", "int4:group=0", "--out", MISSING],
    "benchmark": ["benchmark", "--data", MISSING, "--out", MISSING, "--recipes", "prune:sparsity=2"],
    "export": ["export", "--model", MISSING, "--out", MISSING + "-onnx"],
    "export-opset": ["export", "--out", MISSING + "-onnx", "--opset", "7"],
    "sensitivity": ["sensitivity", "--data", MISSING, "--method", "prune+int8"],
    "inspect": ["inspect", "--model", MISSING, "--out", MISSING + "-view"],
    "serve": ["serve", "--model", MISSING, "--no-warm"],
}


def test_every_subcommand_has_a_case():
    parser = edge_asr.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) <= {c.split("-speeds")[0].split("-knob")[0].split("-opset")[0] for c in CASES}, set(commands)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_argument_gives_one_line(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = edge_asr.main(CASES[name])
    except SystemExit as stop:  # argparse's own usage errors exit 2 after printing usage + one error line
        code = stop.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "error" in last and len(last) < 400, err
    assert not (tmp_path / "missing").exists()  # refused before anything was written


def test_debug_shows_the_traceback():
    with pytest.raises(Exception):
        edge_asr.main(["--debug", "evaluate", "--model", MISSING, "--data", MISSING])


def test_a_setting_error_names_the_flag(capsys):
    """The library names its setting (freeze_layers); the CLI names the flag (--freeze-layers)."""
    from asr_core.errors import SettingsError

    parser = edge_asr.build_parser()
    err = SettingsError("freeze_layers must be between 0 and 8, got 9", setting="freeze_layers")
    assert edge_asr.flag_for(err, parser, ["train"]) == "--freeze-layers"
    assert edge_asr.flag_for(err, parser, ["evaluate"]) is None  # evaluate has no such flag
