"""benchmark and sensitivity end to end on a tiny model and two real utterances."""
import json
import os

from asr_core.checkpoint import load_model
from asr_core.data import load_utterances
from compression.benchmark import run_benchmark
from compression.charts import pareto_front
from compression.recipe import parse_recipe
from compression.sensitivity import sensitivity


def test_benchmark_writes_every_output(tiny_model_dir, dev_dir, tmp_path):
    utts = load_utterances(str(dev_dir / "1272"), limit=2)
    table = run_benchmark(tiny_model_dir, utts, ["int8", "prune:sparsity=0.5+kmeans:clusters=16+int8"],
                          str(tmp_path), progress=False, runtimes=("torch", "onnx"))
    assert list(table["variant"])[0] == "FP32 (baseline)" and len(table) == 6
    assert list(table["runtime"]) == ["torch"] * 3 + ["onnx"] * 3 and (table["ram_mb"] > 0).all()
    onnx_rows = table[table["runtime"] == "onnx"]
    assert abs(onnx_rows["wer"].iloc[0] - table["wer"].iloc[0]) < 1e-9  # FP32 on ONNX Runtime: the same text
    table = table.iloc[:3]
    assert list(table["algorithm"]) == ["", "gptq", "sparsegpt+weighted+gptq"]  # which algorithm made each row
    assert table["compression"].iloc[0] == 1.0 and (table["compression"].iloc[1:] > 2).all()
    for name in ("results.md", "results.csv", "results.json", "charts.html"):
        assert os.path.getsize(tmp_path / name) > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["n_utterances"] == 2 and len(data["rows"]) == 6


def test_pareto_front():
    assert pareto_front([10, 5, 3, 4], [0.1, 0.2, 0.5, 0.15]) == [2, 3, 0]


def test_sensitivity_rows(tiny_model_dir, dev_dir):
    model, tokenizer = load_model(tiny_model_dir)
    rows = sensitivity(model, tokenizer, load_utterances(str(dev_dir / "1272"), limit=2), "int4:group=16",
                       progress=False)
    groups = [r["group"] for r in rows]
    assert groups[0].startswith("(none") and "blocks.*.ffn1.linear1" in groups and "head" not in groups
    assert all(r["wer"] >= 0 for r in rows)


def test_long_recipes_get_distinct_folders():
    from compression.benchmark import slug
    from compression.recipe import naive_twin

    a = "structured:fraction=0.3+prune:sparsity=0.5+kmeans:clusters=8+int8"
    b = "structured:fraction=0.3+prune:sparsity=0.5+kmeans:clusters=16+int8"
    long_a, long_b = (parse_recipe(r).describe() for r in (a, b))
    assert slug(long_a) != slug(long_b) and len(slug(long_a)) <= 80
    assert naive_twin("prune:sparsity=0.5+int8") == "prune:sparsity=0.5,algo=magnitude+int8:algo=rtn"
