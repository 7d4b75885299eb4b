"""The studio's comparison logic and every bad-input case, without a browser."""
import numpy as np
import pytest
import soundfile as sf

import app
from asr_core.errors import AudioError, SettingsError
from conftest import speechlike


@pytest.fixture(scope="module")
def studio(tiny_model_dir):
    return app.Studio(tiny_model_dir, max_seconds=20, timed_runs=1, cache_size=3)


def test_every_variant_measures(studio, wav_file):
    samples = studio.load_clip(wav_file)
    results = {}
    for spec in app.VARIANTS:
        results[spec.key] = studio.measure(spec.recipe(spec.default), samples, "hello world")
        r = results[spec.key]
        assert isinstance(r["transcript"], str) and r["latency_ms"] > 0 and r["size_mb"] > 0
        assert 0 <= r["wer"] and r["rtf"] > 0
    rows = app.table_rows(results, "hello world")
    assert all(row[0].startswith(s.label) for row, s in zip(rows, app.VARIANTS)) and len(rows) == len(app.VARIANTS)
    assert rows[0][9] == "1.0x" and float(rows[1][9].rstrip("x")) > 2  # int8 is smaller than fp32
    assert rows[0][8] == "—"  # RAM is measured only when asked
    assert rows[0][1] == "—" and rows[1][1] == "gptq"  # the algorithm that built each row
    assert app.figure(results) is not None
    path = app.write_csv(results, studio.workdir)
    assert len(open(path).read().splitlines()) == len(app.VARIANTS) + 1
    assert len(studio.cache) <= 3 + 1  # LRU-bounded (+ the baseline, never evicted)


def test_the_rows_default_to_the_standard_recipes():
    """One default recipe list: the studio's rows at their default knobs are the benchmark's standard set."""
    import studio as studio_module
    from compression.recipe import STANDARD_RECIPES

    assert studio_module.default_recipes() == STANDARD_RECIPES


def test_about_tab_shows_the_short_card_without_its_metadata():
    from conftest import REPO

    text = app.model_card(str(REPO / "checkpoints" / "conformer-ctc-whisper-base"))
    assert text.startswith("# conformer-ctc-whisper-base") and "pipeline_tag" not in text and len(text) < 8000


def test_no_reference_shows_dash(studio, wav_file):
    results = {"fp32": studio.measure("", studio.load_clip(wav_file), None)}
    row = app.table_rows(results, None)[0]
    assert row[3] == "—" and row[4] == "—"


def test_a_variant_runs_on_onnx_runtime_beside_pytorch_with_its_ram(studio, wav_file):
    """"Both" gives each variant a PyTorch row and an ONNX Runtime row (exported once, from the artifact's own
    codes); the ONNX row's size is model.onnx's and its text that of the torch row; RAM is measured on request."""
    if app.onnx_missing():
        pytest.skip(app.onnx_missing())
    knobs = [v for spec in app.VARIANTS[1:] for v in (spec.key == "int8", spec.default, "calibrated")]
    table, _, csv_path, status, results = app.run_all(studio, wav_file, "hello world", False, [], "both", True,
                                                      *knobs)
    assert list(results) == ["fp32", "fp32@onnx", "int8", "int8@onnx"], status
    labels = [row[0] for row in table]
    assert labels[1].endswith("· ONNX Runtime") and not labels[0].endswith("ONNX Runtime")
    assert table[1][9] == "1.0x" and table[1][10] == "1.00x"  # the ONNX rows against the ONNX baseline
    for key in ("fp32", "int8"):
        torch_row, onnx_row = results[key], results[key + "@onnx"]
        assert onnx_row["runtime"] == "onnx" and isinstance(onnx_row["transcript"], str)
        assert torch_row["ram_mb"] > 0 and onnx_row["ram_mb"] > 0
    assert results["fp32@onnx"]["transcript"] == results["fp32"]["transcript"]  # fp32: the same log-probs
    assert results["int8@onnx"]["size_mb"] < 0.5 * results["fp32@onnx"]["size_mb"]  # int8 codes, not fp32
    variant = studio.variant("int8")
    assert variant.onnx is not None and set(variant.ram_mb) == {"torch", "onnx"}
    assert "ram_mb" in open(csv_path).readline() and "PyTorch and ONNX Runtime" in status
    # a knob change on PyTorch only drops that row's stale ONNX Runtime row
    again = app.rerun_one(studio, "int8", wav_file, "hello world", False, "torch", False, results, True, None,
                          "naive")[-1]
    assert "int8@onnx" not in again and again["int8"]["algorithm"] == "rtn" and again["int8"]["ram_mb"] is None
    failed = app.rerun_one(studio, "int8", wav_file, "hello world", False, "tpu", False, again, True, None, "naive")
    assert "runtime must be one of" in failed[3] and failed[-1] is again  # the table's rows stay as shown
    assert "runtime must be one of" in app.run_all(studio, wav_file, "", False, [], "tpu", False, *knobs)[3]


def test_cache_returns_the_same_variant(studio):
    a = studio.variant("prune:sparsity=0.5")
    assert studio.variant("prune:sparsity=0.50") is a


def test_word_diff_marks_every_edit():
    out = app.diff_html("the cat sat on the mat", "the bat sat on mat")
    assert 'title="reference: cat"' in out and ">bat<" in out  # substitution
    assert 'line-through;border-radius:3px;padding:0 2px" title="deleted">the<' in out  # deletion
    assert 'title="inserted">today<' in app.diff_html("sat on the mat", "sat on the mat today")  # insertion
    assert app.diff_html(None, "Hello") == "hello"
    assert "nothing recognised" in app.diff_html(None, "")


@pytest.mark.parametrize("make,message", [
    (lambda d: str(d / "missing.wav"), "No such audio"),
    (lambda d: (d / "notes.wav").write_text("not audio") and str(d / "notes.wav"), "Failed to load audio"),
    (lambda d: sf.write(d / "silent.wav", np.zeros(16000), 16000) or str(d / "silent.wav"), "silent"),
    (lambda d: sf.write(d / "long.wav", np.tile(speechlike(1.0), 25), 16000) or str(d / "long.wav"), "limit"),
    (lambda d: None, "No audio"),
])
def test_bad_clips_give_messages(studio, tmp_path, make, message):
    with pytest.raises(AudioError, match=message):
        studio.load_clip(make(tmp_path))
    assert "silent" in app.friendly(AudioError("silent"))


def test_odd_but_valid_audio_is_accepted(studio, tmp_path):
    for rate, channels in ((8000, 2), (48000, 1), (44100, 2)):
        path = tmp_path / f"{rate}_{channels}.wav"
        x = speechlike(1.0, rate)
        sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, rate)
        assert len(studio.load_clip(str(path))) == 16000


def test_knobs_out_of_range_are_refused():
    spec = app.SPECS["prune"]
    with pytest.raises(SettingsError, match="between"):
        spec.recipe(1.5)
    with pytest.raises(SettingsError):
        app.SPECS["kmeans"].recipe(1)
    assert app.SPECS["kmeans"].recipe(16.0) == "kmeans:clusters=16"
    assert app.SPECS["int8"].recipe(None) == "int8"


def test_word_lm_decodes_every_variant_when_the_model_ships_one(tiny_model_dir, tmp_path, wav_file):
    import shutil

    from asr_core.beam_search import LM_FILE, BeamSearchDecoder
    from asr_core.lm import build_kneser_ney

    folder = tmp_path / "with_lm"
    shutil.copytree(tiny_model_dir, folder)
    build_kneser_ney([["hello", "world"]], 2).write_arpa(str(folder / LM_FILE))
    with_lm = app.Studio(str(folder), max_seconds=20, timed_runs=1, cache_size=3)
    assert isinstance(with_lm.lm_decoder, BeamSearchDecoder)
    samples = with_lm.load_clip(wav_file)
    assert with_lm.measure("int8", samples, "hello world")["decoding"] == "beam search + word LM"
    assert with_lm.measure("int8", samples, "hello world", use_lm=False)["decoding"] == "greedy"
    plain = app.Studio(tiny_model_dir, max_seconds=20, timed_runs=1, cache_size=1)
    assert plain.lm_decoder is None and plain.measure("", samples, None)["decoding"] == "greedy"


def test_each_variant_can_be_naive_or_calibrated(studio, wav_file):
    spec = app.SPECS["prune"]
    assert spec.recipe(0.5, "naive") == "prune:sparsity=0.5,algo=magnitude"
    assert spec.recipe(0.5) == "prune:sparsity=0.5"
    samples = studio.load_clip(wav_file)
    naive, calibrated = (studio.measure(spec.recipe(0.5, a), samples, None) for a in app.ALGORITHMS[::-1])
    assert naive["algorithm"] == "magnitude" and calibrated["algorithm"] == "sparsegpt"
    assert app.SPECS["combined"].recipe(0.5, "naive") == \
        "prune:sparsity=0.5,algo=magnitude+kmeans:clusters=16,algo=lloyd+int8:algo=rtn"
    with pytest.raises(SettingsError, match="algorithm"):
        spec.recipe(0.5, "magic")
    assert studio.stats.layers and studio.calibration_seconds > 0


def test_peers_are_rows_below_ours_marked_as_not_ours(studio, wav_file):
    from asr_core.peers import available_peers

    if available_peers()["pocketsphinx"]:
        pytest.skip(available_peers()["pocketsphinx"])
    samples = studio.load_clip(wav_file)
    results = {"fp32": studio.measure("", samples, "hello world"),
               app.PEER_PREFIX + "pocketsphinx": studio.measure_peer("pocketsphinx", samples, "hello world")}
    rows = app.table_rows(results, "hello world")
    assert rows[0][0].startswith("FP32") and rows[1][0] == "pocketsphinx (peer, not ours)" and rows[1][1] == "peer"
    assert app.figure(results) is not None and app.write_csv(results, studio.workdir)


def default_knobs():
    """The flat [on, knob, algorithm] list of every row at its defaults, as the page sends it."""
    return [v for spec in app.VARIANTS[1:] for v in (spec.enabled, spec.default, "calibrated")]


def test_the_class_view_explains_and_shows_each_method(studio, wav_file):
    for key in ("int4", "kmeans", "svd"):
        layer, text, hist, bars, spectrum, frames, storage, status = app.explain_variant(studio, key, None, wav_file,
                                                                                       False, *default_knobs())
        assert "⚠" not in status and "pictures computed" in status, status
        assert "$$" in text and app.SPECS[key].label in text and "bits per weight" in storage
        assert hist.data and bars.data and frames.data and layer["value"] in layer["choices"]
        assert spectrum["visible"] == (key == "svd")
    # a layer the variant does not have falls back to its default; a second look is served from the cache
    again = app.explain_variant(studio, "svd", "no.such.layer", wav_file, True, *default_knobs())
    assert "⚠" not in again[-1] and again[2].layout.font.size == app.PROJECTOR_FONT
    assert studio.inspect(app.SPECS["svd"].recipe(0.9), studio.load_clip(wav_file))["seconds"] < 0.05


def test_a_sweep_is_cached_and_leaves_the_page_cache_alone(studio, wav_file):
    before = list(studio.cache)
    sweep = lambda *a: list(app.run_sweep(studio, *a, False))  # noqa: E731 - every (chart, status) it yields
    steps = sweep("prune", 3, app.SWEEP_ON[0], wav_file, "hello world")
    fig, status = steps[-1]
    assert len(steps) == 6 and "so far" in steps[0][1]  # the chart grows point by point
    assert "6 points in" in status and "(0 already computed)" in status, status  # 3 knob values, two algorithms
    assert len(fig.data) >= 4  # WER and size, naive and calibrated
    assert list(studio.cache) == before  # the sweep built its points outside the variant cache
    assert "(6 already computed)" in sweep("prune", 3, app.SWEEP_ON[0], wav_file, "hello world")[-1][1]
    assert "baseline's own transcript" in sweep("prune", 3, app.SWEEP_ON[0], wav_file, "")[-1][1]
    assert "no knob" in sweep("int8", 3, app.SWEEP_ON[0], wav_file, "")[-1][1]
    assert "clip first" in sweep("prune", 3, app.SWEEP_ON[0], None, "")[-1][1]


def test_url_state_sets_valid_values_and_ignores_the_rest():
    controls = [(spec, f"on-{spec.key}", f"knob-{spec.key}", f"algo-{spec.key}") for spec in app.VARIANTS[1:]]
    fields = app.url_fields(controls, "method", "layer", "present", "runtime", "ram")
    query = {"prune": "0.7", "prune.algo": "naive", "int4.on": "false", "kmeans": "999", "view": "kmeans",
             "layer": "blocks.0.ffn1.linear1", "present": "1", "svd.algo": "magic", "runtime": "both", "ram": "on"}
    updates = {name: u.get("value") for (name, _, _), u in zip(fields, app.url_state(fields, query))}
    assert updates["prune"] == 0.7 and updates["prune.algo"] == "naive" and updates["int4.on"] is False
    assert updates["kmeans"] is None and updates["svd.algo"] is None  # out of range, unknown: left as they are
    assert updates["view"] == "kmeans" and updates["layer"] == "blocks.0.ffn1.linear1" and updates["present"] is True
    assert updates["runtime"] == "both" and updates["ram"] is True
    assert app.url_state(fields, {"runtime": "tpu"})[-2] == {"__type__": "update"}  # unknown runtime: unchanged
    js = app.url_js(fields)
    assert "replaceState" in js and '"prune", "0.5"' in js  # only values off their default are written


def test_presentation_mode_redraws_only_a_panel_already_drawn(studio, wav_file):
    idle = app.redraw(studio, "int4", None, wav_file, True, *default_knobs())
    assert all(u == {"__type__": "update"} for u in idle)  # nothing computed before the panel was first drawn
    drawn = app.redraw(studio, "int4", "blocks.0.ffn1.linear1", wav_file, True, *default_knobs())
    assert drawn[2].layout.font.size == app.PROJECTOR_FONT and drawn[0]["value"] == "blocks.0.ffn1.linear1"


def test_the_long_handlers_get_gradios_progress_bar():
    """Gradio fills a progress bar only into a positional parameter defaulting to gr.Progress; the wrapped
    handlers of "Run all variants", a row's knob and the Dataset recompute must declare one after their inputs."""
    import gradio as gr
    from gradio.helpers import special_args

    seen = {}

    def fn(studio, key, a, b, progress=None):
        seen.update(studio=studio, key=key, a=a, b=b, progress=progress)
        return "done"

    handler = app._with_progress(fn, "STUDIO", 2, "prune")
    inputs, progress_index, _, _ = special_args(handler, ["x", "y"])
    assert progress_index == 2 and isinstance(inputs[2], gr.Progress)
    assert handler(*inputs) == "done"
    assert seen == {"studio": "STUDIO", "key": "prune", "a": "x", "b": "y", "progress": inputs[2]}


def test_a_slow_decode_is_timed_fewer_times():
    """Up to three timed runs (the median), but once the budget is spent no more: a damaged variant whose LM
    decode takes seconds is timed once, so its knob change stays quick."""
    from studio import median_seconds

    calls = []

    def timed(seconds):
        def once():
            calls.append(seconds)
            return seconds
        return once

    assert median_seconds(timed(0.1), 3, budget=2.0) == 0.1 and len(calls) == 3
    calls.clear()
    assert median_seconds(timed(3.0), 3, budget=2.0) == 3.0 and len(calls) == 1
    calls.clear()
    assert median_seconds(timed(1.5), 3, budget=2.0) == 1.5 and len(calls) == 2


def test_without_the_onnx_extra_the_runtime_choice_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert app.onnx_missing() == 'needs onnxruntime: pip install -e ".[onnx]"'
    controls = [(spec, f"on-{spec.key}", f"knob-{spec.key}", f"algo-{spec.key}") for spec in app.VARIANTS[1:]]
    fields = app.url_fields(controls, "method", "layer", "present", "runtime", "ram")
    assert app.url_state(fields, {"runtime": "onnx"})[-2] == {"__type__": "update"}  # not offered: not set


def test_an_onnx_folder_as_the_baseline_is_refused_with_the_way_to_onnx_runtime(tmp_path):
    """The studio compresses its baseline's PyTorch weights: an exported folder gets one message naming the folder
    it came from, before anything loads."""
    import json

    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"format": "edge-asr-onnx", "onnx": {"source": "ckpt/base"}}))
    with pytest.raises(SettingsError, match="exported ONNX model.*ckpt/base.*Runtime: ONNX Runtime"):
        app.Studio(str(tmp_path))
