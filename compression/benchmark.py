"""Baseline and compressed variants measured in one run: size on disk, WER/CER, latency, RTF, speed-up.

Every variant goes through the same path a user's would: compress -> save artifact -> ``load_model`` ->
``evaluate`` (one utterance at a time, fixed threads, warm-up, median latency). Writes results.json,
results.csv, results.md and plotly charts (HTML; PNG too when kaleido can render offline).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time

import pandas as pd
import torch

from asr_core.checkpoint import folder_bytes, is_artifact, load_model, read_tokenizer, save_model
from asr_core.errors import SettingsError
from asr_core.evaluation import evaluate
from asr_core.transcribe import Transcriber, make_decoder

from .artifact import read_manifest, save_artifact
from .calibration import stats_for
from .charts import tradeoff_figure
from .compress import apply_recipe
from .methods import is_calibrated
from .recipe import STANDARD_RECIPES, algorithms, naive_twin, parse_recipe, recipe_from_json

# every standard recipe with its data-free twin beside it (algo=...)
DEFAULT_RECIPES = [r for recipe in STANDARD_RECIPES for r in (naive_twin(recipe), recipe)]


def slug(text: str) -> str:
    """A folder name for a recipe; long ones are cut and keep a hash of the whole, so two never share one."""
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "variant"
    if len(name) <= 80:
        return name
    return name[:71] + "_" + hashlib.sha1(text.encode()).hexdigest()[:8]


def build_variant(entry: str, out_root: str, base_model=None, tokenizer=None,
                  stats=None) -> tuple[str, str, str]:
    """A recipe string/file -> artifact folder under out_root; an existing model folder is used as is.
    Returns (label, algorithms, folder)."""
    if os.path.isdir(entry) and os.path.exists(os.path.join(entry, "config.json")):
        made_by = algorithms(recipe_from_json(read_manifest(entry)["recipe"])) \
            if is_artifact(entry) else ""
        return os.path.basename(os.path.normpath(entry)), made_by, entry
    recipe = parse_recipe(entry)
    folder = os.path.join(out_root, slug(recipe.describe()))
    compressed = apply_recipe(base_model, recipe, stats=stats)
    save_artifact(compressed, folder, tokenizer, recipe.to_json())
    return recipe.describe(), algorithms(recipe), folder


def run_benchmark(model_dir: str, utterances, recipes: list[str], out_dir: str, *,
                  progress: bool = True, decoding: str = "greedy", peers: bool = False, calib: str | None = None,
                  calib_utterances: int | None = None, runtimes: tuple[str, ...] = ("torch",),
                  memory: bool = True) -> pd.DataFrame:
    """``decoding``: "greedy" (the model alone) or "lm" (every row decoded with the baseline folder's word LM,
    so rows still differ only in the acoustic model). ``calib`` / ``calib_utterances``: calibration audio (default:
    the bundled set), whose statistics are collected once and serve every calibrated recipe. Every variant runs
    with the process's torch threads (the entry point sets them once). ``runtimes``: "torch" and/or "onnx" (each
    variant exported with ``edge-asr export`` and run on ONNX Runtime with the same threads). ``memory``: each
    row's resident memory, measured in a fresh process (:func:`asr_core.memory.peak_rss_mb`)."""
    threads = torch.get_num_threads()
    os.makedirs(out_dir, exist_ok=True)
    artifacts = os.path.join(out_dir, "artifacts")
    base_model, tokenizer = load_model(model_dir)
    if is_artifact(model_dir):
        raise SettingsError("benchmark needs a trained checkpoint as its baseline, not a compressed artifact",
                            setting="model")
    fp32_dir = os.path.join(artifacts, "fp32")
    save_model(fp32_dir, base_model, read_tokenizer(model_dir), int8=False)  # the FP32 row: full-precision bytes
    decoder = make_decoder(tokenizer, model_dir, decoding)

    def transcriber(folder: str) -> Transcriber:
        model, tok = load_model(folder, threads=threads)  # threads: the ONNX session's; torch's are set already
        return Transcriber(model, tok, decoder=decoder)

    stats = None
    if any(not os.path.isdir(e) and any(is_calibrated(s) for _, s in parse_recipe(e).steps) for e in recipes):
        stats = stats_for(base_model, calib, calib_utterances)
        if progress:
            print(f"calibration: {stats.describe()}", flush=True)
    variants = [("FP32 (baseline)", "", fp32_dir, 0.0)]
    for entry in recipes:
        start = time.perf_counter()
        label, algo, folder = build_variant(entry, artifacts, base_model, tokenizer, stats)
        variants.append((label, algo, folder, time.perf_counter() - start))
        if progress:
            print(f"built {label} in {variants[-1][3]:.1f} s -> {folder}", flush=True)
    # one untimed pass first: the process's first model runs pay for allocator and kernel warm-up, which would
    # otherwise be charged to whichever variant is measured first (the baseline)
    evaluate(transcriber(fp32_dir), utterances[:10], warmup=0, progress=False)
    rows = []
    for runtime in runtimes:
        for label, algo, folder, build_seconds in variants:
            rows.append(_measure(label, algo, folder, build_seconds, runtime, transcriber, utterances, out_dir,
                                 memory, progress))
    if peers:
        rows += peer_rows(utterances, out_dir, progress, memory)
    table = pd.DataFrame(rows)
    base = table.iloc[0]
    table["compression"] = base["size_mb"] / table["size_mb"]
    table["delta_wer_rel"] = (table["wer"] - base["wer"]) / base["wer"] if base["wer"] > 0 else float("nan")
    table["speedup"] = base["latency_ms_median"] / table["latency_ms_median"]
    table.attrs.update(threads=threads, n_utterances=len(utterances), decoding=decoding,
                       audio_seconds=sum(u.duration for u in utterances),
                       calibration=stats.describe() if stats is not None else None)
    write_outputs(table, out_dir)
    return table


def _measure(label, algo, folder, build_seconds, runtime, transcriber, utterances, out_dir, memory, progress) -> dict:
    """One row: the variant's folder on ``runtime`` (an ONNX export made beside it first), WER, latency, RAM."""
    if runtime == "onnx":
        from .export import export_onnx

        onnx_folder = folder.rstrip("/") + ".onnx"
        start = time.perf_counter()
        export_onnx(folder, onnx_folder, check=False)
        build_seconds += time.perf_counter() - start
        folder, label = onnx_folder, f"{label} [onnx]"
    if progress:
        print(f"evaluating {label}", flush=True)
    result = evaluate(transcriber(folder), utterances, model_dir=folder, progress=progress)
    row = {"variant": label, "runtime": runtime, "algorithm": algo, "build_seconds": round(build_seconds, 2),
           "size_mb": folder_bytes(folder) / 1e6, "wer": result["wer"], "cer": result["cer"],
           "latency_ms_median": result["latency_ms_median"], "latency_ms_p90": result["latency_ms_p90"],
           "rtf": result["rtf"], "folder": folder}
    if memory:
        from asr_core.memory import peak_rss_mb

        row["ram_mb"] = peak_rss_mb(folder, runtime, threads=torch.get_num_threads())["peak_mb"]
    with open(os.path.join(out_dir, f"hyp_{slug(label)}.json"), "w") as f:
        json.dump(result["utterances"], f, indent=1)
    return row


def peer_rows(utterances, out_dir: str, progress: bool = True, memory: bool = False) -> list[dict]:
    """Whisper tiny.en and pocketsphinx on the same utterances, as rows marked "peer" (not ours); a peer that
    cannot run here is left out with a note. ``memory``: RAM measured as for our rows (fresh process, one clip)."""
    from asr_core.peers import PEERS, available_peers, evaluate_peer, load_peer

    rows, missing = [], available_peers()
    for name in PEERS:
        if missing[name]:
            print(f"peer {name}: {missing[name]}; left out", flush=True)
            continue
        result = evaluate_peer(load_peer(name, torch.get_num_threads()), utterances, progress=progress)
        rows.append({"variant": f"{name} (peer)", "runtime": "peer", "algorithm": "peer", "build_seconds": 0.0,
                     "size_mb": result["bytes_on_disk"] / 1e6, "wer": result["wer"], "cer": result["cer"],
                     "latency_ms_median": result["latency_ms_median"], "latency_ms_p90": result["latency_ms_p90"],
                     "rtf": result["rtf"], "folder": ""})
        if memory:
            from asr_core.memory import peak_rss_mb

            rows[-1]["ram_mb"] = peak_rss_mb(name, "peer", threads=torch.get_num_threads())["peak_mb"]
        with open(os.path.join(out_dir, f"hyp_{slug(name)}.json"), "w") as f:
            json.dump(result["utterances"], f, indent=1)
    return rows


COLUMNS = ["variant", "runtime", "algorithm", "size_mb", "ram_mb", "compression", "wer", "delta_wer_rel", "cer",
           "latency_ms_median", "rtf", "speedup", "build_seconds"]


def markdown_table(table: pd.DataFrame) -> str:
    lines = ["| variant | runtime | algorithm | size MB | RAM MB | ratio | WER | ΔWER rel | CER | median latency ms | "
             "RTF | speed-up |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in table.iterrows():
        ram = r.get("ram_mb")
        ram = "-" if ram is None or pd.isna(ram) else f"{ram:.0f}"
        lines.append(f"| {r['variant']} | {r.get('runtime') or 'torch'} | {r.get('algorithm') or '-'} | "
                     f"{r['size_mb']:.2f} | {ram} | {r['compression']:.2f}x | {r['wer']:.2%} | "
                     f"{r['delta_wer_rel']:+.1%} | {r['cer']:.2%} | {r['latency_ms_median']:.0f} | "
                     f"{r['rtf']:.4f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def charts(table: pd.DataFrame):
    """The benchmark's figure (see :func:`compression.charts.tradeoff_figure`)."""
    return tradeoff_figure(table["variant"].tolist(), table["size_mb"].tolist(), table["latency_ms_median"].tolist(),
                           table["wer"].tolist(), table.get("algorithm", pd.Series([""] * len(table))).tolist(),
                           width=1100)


def write_outputs(table: pd.DataFrame, out_dir: str) -> None:
    table[[c for c in COLUMNS if c in table]].to_csv(os.path.join(out_dir, "results.csv"), index=False)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": table.attrs, "rows": table.to_dict(orient="records")}, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_table(table) + "\n")
    fig = charts(table)
    fig.write_html(os.path.join(out_dir, "charts.html"), include_plotlyjs=True)
    try:  # PNG needs kaleido and a browser it can drive; optional
        fig.write_image(os.path.join(out_dir, "charts.png"))
    except Exception as err:  # noqa: BLE001 - any failure here only skips the PNG
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        print(f"(charts.png skipped, charts.html has the same charts: {type(err).__name__}"
              f"{': ' + reason if reason else ''})")
