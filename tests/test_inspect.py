"""The class view's numbers and figures (compression.inspect, compression.inspect_figures) and `edge-asr inspect`,
on the tiny model: every method's report is JSON, its parts agree with what is stored, and the figures hold data."""
import json
import os

import pytest
import torch

from asr_core.checkpoint import folder_bytes
from asr_core.errors import SettingsError
from asr_core.text import CharTokenizer
from compression import inspect
from compression.artifact import load_artifact, save_artifact
from compression.compress import apply_recipe
from compression.inspect_figures import figures, sweep_figure
from compression.recipe import parse_recipe
from conftest import speechlike

RECIPES = ["int8:algo=rtn", "int4:group=16,algo=rtn", "ternary:algo=rtn", "prune:sparsity=0.5,algo=magnitude",
           "prune:pattern=2:4,algo=magnitude", "structured:fraction=0.5,algo=norm", "svd:energy=0.8,algo=weight",
           "kmeans:clusters=8,algo=lloyd", "prune:sparsity=0.5,algo=magnitude+kmeans:clusters=16,algo=lloyd+int8:algo=rtn"]


@pytest.fixture(scope="module")
def features(tiny_model):
    return inspect.clip_features(speechlike(2.0), tiny_model)


def build(tiny_model, recipe, folder):
    parsed = parse_recipe(recipe)
    save_artifact(apply_recipe(tiny_model, parsed), str(folder), CharTokenizer(), parsed.to_json())
    return load_artifact(str(folder))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_method_is_reported_and_shown(tiny_model, features, tmp_path, recipe):
    model = build(tiny_model, recipe, tmp_path)
    report = inspect.inspect_variant(tiny_model, model, str(tmp_path), CharTokenizer(), features)
    json.dumps(report)  # plain numbers all the way down
    assert report["layer"] in report["layer_names"]
    assert sum(p["bytes"] for p in report["size"]["parts"]) == report["size"]["total_bytes"] == folder_bytes(tmp_path)
    h = report["histogram"]
    layer = tiny_model.get_submodule(report["layer"]).weight
    assert sum(h["before"]) == layer.numel()
    assert all(r["output_error"] is not None and r["output_error"] >= 0 for r in report["layers"])
    assert len(report["frames"]["baseline"]["argmax"]) == report["frames"]["frames"] > 0
    assert report["storage"]["total_bytes"] > 0
    figs = figures(report)
    assert {"histogram", "layers", "frames"} <= set(figs) and all(len(f.data) > 0 for f in figs.values())
    text = inspect.explain(report)
    assert "$$" in text and "bits per weight" in text and f"{report['size']['total_bytes']:,}" in text


def test_what_is_drawn_matches_what_is_stored(tiny_model, features, tmp_path):
    """k-means: the codebook's centroids on the histogram; int4: 16 grid levels and 4 + 16/g bits a weight;
    magnitude pruning: the mask's sparsity, every pruned weight inside ±τ."""
    km = inspect.inspect_variant(tiny_model, build(tiny_model, "kmeans:clusters=8,algo=lloyd", tmp_path / "k"),
                                 str(tmp_path / "k"), CharTokenizer(), layer="blocks.0.ffn1.linear1")
    assert len(km["histogram"]["levels"]) == 8 and km["frames"] is None
    assert sum(c > 0 for c in km["histogram"]["after"]) <= 8  # every weight sits on a centroid
    q4 = inspect.inspect_variant(tiny_model, build(tiny_model, "int4:group=16,algo=rtn", tmp_path / "q"),
                                 str(tmp_path / "q"), CharTokenizer(), layer="blocks.0.ffn1.linear1")
    stored = {t["tensor"]: t for t in q4["storage"]["tensors"]}
    n = tiny_model.get_submodule("blocks.0.ffn1.linear1").weight.numel()
    assert len(q4["histogram"]["levels"]) == 16  # 4 bits a weight before Huffman coding, 16 bits a group of 16
    assert q4["storage"]["bits_per_weight"] == pytest.approx(8 * (stored["weight.codes"]["bytes"] + 2 * n / 16) / n)
    assert f"{n:,} kept weights × 4 bits ÷ 8 = {n // 2:,} B, Huffman-coded" in stored["weight.codes"]["formula"]
    pr = inspect.inspect_variant(tiny_model, build(tiny_model, "prune:sparsity=0.5,algo=magnitude,scope=layer",
                                                   tmp_path / "p"), str(tmp_path / "p"), CharTokenizer(), features)
    changed = [r for r in pr["layers"] if r["layer"] in pr["layer_names"]]
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in changed)
    assert pr["histogram"]["pruned_below_threshold"] == 1.0 and pr["histogram"]["threshold"] > 0


def test_svd_spectrum_marks_the_kept_rank(tiny_model, tmp_path):
    model = build(tiny_model, "svd:energy=0.8,algo=weight", tmp_path)
    factorised = list(json.loads((tmp_path / "compression.json").read_text())["lowrank"])
    report = inspect.inspect_variant(tiny_model, model, str(tmp_path), CharTokenizer(), layer=factorised[0])
    s = report["spectrum"]
    assert s["rank"] == report["storage"]["lowrank"]["r"] and s["energy_kept"] >= 0.8 - 1e-6
    assert s["params_after"] < s["params_before"] and len(s["sigma"]) == s["full_rank"]


def test_a_lossless_variant_agrees_with_the_baseline(tiny_model, features, tmp_path):
    """Sparsity 0 stores fp16 values: every layer's output error is fp16 rounding, the frames agree."""
    report = inspect.inspect_variant(tiny_model, build(tiny_model, "prune:sparsity=0.0,algo=magnitude", tmp_path),
                                     str(tmp_path), CharTokenizer(), features)
    assert max(r["output_error"] for r in report["layers"]) < 1e-2
    assert report["frames"]["agreement"] > 0.95


def test_structured_layers_are_compared_on_their_module(tiny_model, features, tmp_path):
    model = build(tiny_model, "structured:fraction=0.5,algo=norm", tmp_path)
    report = inspect.inspect_variant(tiny_model, model, str(tmp_path), CharTokenizer(), features)
    rows = {r["layer"]: r for r in report["layers"]}
    # linear1 and linear2 of one FFN share the FFN's output error (their own widths changed)
    assert rows["blocks.0.ffn1.linear1"]["output_error"] == rows["blocks.0.ffn1.linear2"]["output_error"]
    assert rows["blocks.0.ffn1.linear1"]["kept_share"] == pytest.approx(0.5, abs=0.05)


def test_bad_layer_and_wrong_base_are_refused(tiny_model, tmp_path):
    from asr_core.config import preset
    from asr_core.model import ConformerCTC

    model = build(tiny_model, "int8:algo=rtn", tmp_path)
    with pytest.raises(SettingsError, match="no compressed layer") as err:
        inspect.inspect_variant(tiny_model, model, str(tmp_path), CharTokenizer(), layer="head.nope")
    assert err.value.setting == "layer"
    other = ConformerCTC(preset("tiny", n_layers=1))
    with pytest.raises(SettingsError, match="was not made from"):
        inspect.inspect_variant(other, model, str(tmp_path), CharTokenizer())


def test_sweep_figure_draws_both_lines():
    points = [{"value": v, "family": f, "algorithm": a, "wer": w, "size_mb": 1 - v / 2}
              for v, w in ((0.1, 0.2), (0.5, 0.4)) for f, a in (("naive", "magnitude"), ("calibrated", "sparsegpt"))]
    fig = sweep_figure(points, "sparsity", "Pruned", baseline={"wer": 0.1, "size_mb": 1.0})
    assert {t.name for t in fig.data if t.showlegend is not False} == {"naive (magnitude)", "calibrated (sparsegpt)"}


def test_cli_writes_figures_and_numbers(tiny_model_dir, tmp_path, capsys, wav_file):
    import edge_asr

    artifact = tmp_path / "a"
    assert edge_asr.main(["compress", "--model", tiny_model_dir, "--recipe", "int4:group=16,algo=rtn",
                          "--out", str(artifact)]) == 0
    out = tmp_path / "view"
    capsys.readouterr()
    assert edge_asr.main(["inspect", "--model", str(artifact), "--clip", wav_file, "--out", str(out),
                          "--layer", "blocks.1.ffn2.linear1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "inspect.json").read_text())
    assert report["layer"] == "blocks.1.ffn2.linear1" and report["frames"]["frames"] > 0
    assert {"histogram.html", "layers.html", "frames.html", "how_it_works.md"} <= set(os.listdir(out))
    import shutil

    try:
        import kaleido  # noqa: F401
        rendered = bool(shutil.which("chromium") or shutil.which("google-chrome"))
    except ImportError:
        rendered = False
    if rendered:  # kaleido and a Chrome to render in: every figure as PNG too
        for stem in ("histogram", "layers", "frames"):
            assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert len([line for line in printed.splitlines() if "PNG figures skipped" in line]) == 1
        assert not (out / "histogram.png").exists()
    assert edge_asr.main(["inspect", "--model", str(artifact), "--out", str(out), "--layer", "nope"]) == 2
    assert "--layer: no compressed layer" in capsys.readouterr().err


def test_the_clip_is_cut_to_what_the_model_hears(tiny_model):
    long = speechlike(35.0)
    feats = inspect.clip_features(long, tiny_model)
    assert feats.shape[0] <= inspect.MAX_SECONDS * 100 + 1 and torch.isfinite(feats).all()


def test_a_png_that_cannot_be_rendered_is_skipped_with_one_line(capsys):
    """kaleido without a working Chrome raises its own errors: the figure is skipped with a message, no crash."""
    from compression.cli import _write_png

    class Figure:
        def write_image(self, *args, **kwargs):
            raise RuntimeError("Kaleido requires Google Chrome to be installed.\nmore detail")

    assert _write_png(Figure(), "/nonexistent/x.png") is False
    assert "kaleido could not render (Kaleido requires Google Chrome to be installed.)" in capsys.readouterr().out
