"""Edge ASR Studio: the baseline Conformer-CTC and its compressed variants, side by side, in the browser.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--model DIR] [--max-seconds 120]

The page holds no model logic: :class:`Studio` keeps a bounded cache of compressed variants (built with
``compression``, measured on disk as artifacts) and transcribes with ``asr_core``; the handlers below turn
what it returns into a table, a chart and a CSV. The same numbers come from ``edge-asr compress`` and
``edge-asr evaluate``.
"""
from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import jiwer
import torch

from asr_core.audio import SAMPLE_RATE, load_audio
from asr_core.beam_search import has_lm
from asr_core.checkpoint import default_model_dir, folder_bytes, load_model, save_model
from asr_core.errors import EdgeASRError, SettingsError
from asr_core.evaluation import error_rates, evaluate
from asr_core.data import load_utterances
from asr_core.text import normalize_text
from asr_core.transcribe import Transcriber, make_decoder
from compression.artifact import load_artifact, save_artifact
from compression.calibration import stats_for
from compression.compress import apply_recipe
from compression.recipe import algorithms, naive_twin, parse_recipe

ASSETS = Path(__file__).resolve().parent / "assets"
MAX_SECONDS = float(os.environ.get("EDGE_ASR_MAX_SECONDS", 120))  # longer uploads are refused with a message
TIMED_RUNS = 3  # latency = median of this many runs, after one warm-up
# each variant is built by its method's calibrated algorithm (GPTQ, SparseGPT, ...) or its data-free twin
ALGORITHMS = ("calibrated", "naive")


@dataclass(frozen=True)
class VariantSpec:
    """One row of the page: a compression method and the knob that sets it."""

    key: str
    label: str
    template: str  # recipe with {value} for the knob; "" for the baseline
    knob: str | None = None  # knob label
    minimum: float = 0
    maximum: float = 1
    step: float = 0.05
    default: float | None = None
    enabled: bool = True

    def recipe(self, value, algorithm: str = "calibrated") -> str:
        """The recipe for this knob value; ``algorithm`` "naive" gives every step its data-free algorithm."""
        if algorithm not in ALGORITHMS:
            raise SettingsError(f"{self.label}: algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        if not self.template:
            return ""
        if algorithm == "naive":
            return naive_twin(self.recipe(value))
        if self.knob is None:
            return self.template
        if value is None or not (self.minimum <= float(value) <= self.maximum):
            raise SettingsError(f"{self.label}: {self.knob} must be between {self.minimum:g} and {self.maximum:g}, "
                                f"got {value}")
        value = int(value) if float(self.step).is_integer() else round(float(value), 4)
        return self.template.format(value=value)


VARIANTS = [
    VariantSpec("fp32", "FP32 (baseline)", ""),
    VariantSpec("int8", "INT8", "int8"),
    VariantSpec("int4", "INT4", "int4:group={value}", "group size", 16, 256, 16, 64),
    VariantSpec("ternary", "Ternary", "ternary", enabled=False),
    VariantSpec("prune", "Pruned (unstructured)", "prune:sparsity={value}", "sparsity", 0.0, 0.95, 0.05, 0.5),
    VariantSpec("structured", "Pruned (structured)", "structured:fraction={value}", "fraction removed", 0.0, 0.9,
                0.05, 0.3),
    VariantSpec("svd", "Low-rank (SVD)", "svd:energy={value}", "energy kept", 0.3, 1.0, 0.01, 0.9),
    VariantSpec("kmeans", "K-means clustering", "kmeans:clusters={value}", "clusters", 2, 256, 1, 16),
    VariantSpec("combined", "Combined", "prune:sparsity={value}+kmeans:clusters=16+int8", "sparsity", 0.0, 0.95,
                0.05, 0.5),
]
SPECS = {v.key: v for v in VARIANTS}


@dataclass
class Variant:
    recipe: str
    transcriber: Transcriber
    bytes_on_disk: int
    build_seconds: float
    algorithm: str = ""  # per step: gptq, sparsegpt, rtn, magnitude, ...


class Studio:
    """The baseline, a bounded LRU cache of compressed variants, and the measurements the page shows."""

    def __init__(self, model_dir: str | None = None, *, cache_size: int = 10, threads: int = 2,
                 max_seconds: float = MAX_SECONDS, timed_runs: int = TIMED_RUNS, calib: str | None = None):
        self.model_dir = model_dir or default_model_dir()
        self.base, self.tokenizer = load_model(self.model_dir)
        self.threads, self.max_seconds, self.timed_runs = threads, max_seconds, timed_runs
        self.cache_size = cache_size
        self.cache: OrderedDict[str, Variant] = OrderedDict()
        self.lock = threading.Lock()  # one compression/measurement at a time: timings stay honest
        self.workdir = tempfile.mkdtemp(prefix="edge-asr-studio-")
        torch.set_num_threads(threads)
        fp32_dir = os.path.join(self.workdir, "fp32")
        # the baseline's size is measured in fp32, as a file (int8=False: an int8-stored frozen part too)
        save_model(fp32_dir, self.base, self.tokenizer, int8=False)
        self.cache[""] = Variant("", Transcriber(self.base, self.tokenizer), folder_bytes(fp32_dir), 0.0)
        # one word-LM decoder for every variant (the LM ships with the baseline), so that rows differ only in
        # the acoustic model; None when the model folder has no lm.arpa.gz
        self.lm_decoder = make_decoder(self.tokenizer, self.model_dir, "lm") if has_lm(self.model_dir) else None
        # calibration statistics, once: every calibrated variant and knob change reuses them
        start = time.perf_counter()
        self.stats = stats_for(self.base, calib)
        self.calibration_seconds = time.perf_counter() - start

    def variant(self, recipe: str) -> Variant:
        """The compressed model for ``recipe`` (validated), built once and kept while recently used."""
        parsed = parse_recipe(recipe) if recipe else None
        key = parsed.describe() if parsed else ""
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
            start = time.perf_counter()
            folder = os.path.join(self.workdir, f"v{len(os.listdir(self.workdir))}")
            save_artifact(apply_recipe(self.base, parsed, stats=self.stats), folder, self.tokenizer,
                          parsed.to_json())
            model = load_artifact(folder)  # run what was saved: what a device would load
            variant = Variant(key, Transcriber(model, self.tokenizer), folder_bytes(folder),
                              time.perf_counter() - start, algorithms(parsed))
            self.cache[key] = variant
            while len(self.cache) > self.cache_size:
                old_key = next(k for k in self.cache if k)  # never evict the baseline
                del self.cache[old_key]
            return variant

    def load_clip(self, audio) -> "numpy.ndarray":  # noqa: F821
        return load_audio(audio, max_seconds=self.max_seconds)

    def decoder_for(self, variant: Variant, use_lm: bool):
        """The shared word-LM decoder when asked for and available, else the variant's greedy decoder."""
        return self.lm_decoder if use_lm and self.lm_decoder is not None else variant.transcriber.greedy

    def measure(self, recipe: str, samples, reference: str | None, use_lm: bool = True) -> dict:
        """Transcribe ``samples`` with one variant: text, WER/CER (with a reference), latency, RTF, size.

        Latency = median of ``timed_runs`` model passes (after a warm-up) + one decoding pass: the beam search
        is deterministic and costs the same every time, so it is timed once rather than ``timed_runs`` times.
        """
        variant = self.variant(recipe)
        t = variant.transcriber
        decoder = self.decoder_for(variant, use_lm)
        with self.lock:
            log_probs = t.log_probs(samples)  # warm-up
            times = []
            for _ in range(self.timed_runs):
                start = time.perf_counter()
                log_probs = t.log_probs(samples)
                times.append(time.perf_counter() - start)
            start = time.perf_counter()
            text = decoder(log_probs)
            decode_seconds = time.perf_counter() - start
        latency = statistics.median(times) + decode_seconds
        rates = error_rates([reference], [text]) if reference and normalize_text(reference) else None
        return {"recipe": variant.recipe, "transcript": text, "wer": rates["wer"] if rates else None,
                "cer": rates["cer"] if rates else None, "latency_ms": 1000 * latency,
                "rtf": latency / (len(samples) / SAMPLE_RATE), "size_mb": variant.bytes_on_disk / 1e6,
                "build_seconds": variant.build_seconds, "algorithm": variant.algorithm,
                "decoding": "greedy" if decoder is t.greedy else "beam search + word LM"}


# ------------------------------------------------------------------------------------------ presentation
STYLE = {"sub": "background:#fde68a;border-radius:3px;padding:0 2px",
         "ins": "background:#bbf7d0;border-radius:3px;padding:0 2px",
         "del": "background:#fecaca;text-decoration:line-through;border-radius:3px;padding:0 2px"}


def diff_html(reference: str | None, hypothesis: str) -> str:
    """Hypothesis words with substitutions (amber, reference in the tooltip), insertions (green) and
    deletions (red, struck through) against the normalised reference."""
    hyp = normalize_text(hypothesis)
    ref = normalize_text(reference or "")
    if not ref:
        return html.escape(hyp) or "<i>(nothing recognised)</i>"
    if not hyp:
        return f'<span style="{STYLE["del"]}">{html.escape(ref)}</span>'
    out = jiwer.process_words(ref, hyp)
    r, h = ref.split(), hyp.split()
    parts = []
    for chunk in out.alignments[0]:
        if chunk.type == "equal":
            parts.append(html.escape(" ".join(h[chunk.hyp_start_idx:chunk.hyp_end_idx])))
        elif chunk.type == "substitute":
            for rw, hw in zip(r[chunk.ref_start_idx:chunk.ref_end_idx], h[chunk.hyp_start_idx:chunk.hyp_end_idx]):
                parts.append(f'<span style="{STYLE["sub"]}" title="reference: {html.escape(rw)}">{html.escape(hw)}'
                             f'</span>')
        elif chunk.type == "insert":
            parts.append(f'<span style="{STYLE["ins"]}" title="inserted">'
                         f'{html.escape(" ".join(h[chunk.hyp_start_idx:chunk.hyp_end_idx]))}</span>')
        else:
            parts.append(f'<span style="{STYLE["del"]}" title="deleted">'
                         f'{html.escape(" ".join(r[chunk.ref_start_idx:chunk.ref_end_idx]))}</span>')
    return " ".join(parts)


TABLE_HEADERS = ["Variant", "Algorithm", "Transcript (vs reference)", "WER", "CER", "Latency ms", "RTF", "Size MB",
                 "Ratio", "Speed-up"]


def versus_baseline(base: dict | None, row: dict) -> tuple[float | None, float | None]:
    """(compression ratio, speed-up) of a result row against the baseline row (None without a baseline)."""
    if not base:
        return None, None
    return base["size_mb"] / row["size_mb"], base["latency_ms"] / row["latency_ms"]


def table_rows(results: dict[str, dict], reference: str | None) -> list[list]:
    """Results keyed by variant -> display rows (ratio and speed-up against the baseline row)."""
    base = results.get("fp32")
    rows = []
    for key in [v.key for v in VARIANTS if v.key in results]:
        r = results[key]
        fmt = lambda x, f: "—" if x is None else format(x, f)  # noqa: E731
        label = SPECS[key].label + (f" ({r['recipe']})" if r["recipe"] and SPECS[key].knob else "")
        ratio, speedup = versus_baseline(base, r)
        rows.append([label, r.get("algorithm") or "—", diff_html(reference, r["transcript"]), fmt(r["wer"], ".1%"),
                     fmt(r["cer"], ".1%"),
                     f"{r['latency_ms']:.0f}", f"{r['rtf']:.3f}", f"{r['size_mb']:.2f}",
                     fmt(ratio, ".1f") + ("x" if ratio else ""), fmt(speedup, ".2f") + ("x" if speedup else "")])
    return rows


def figure(results: dict[str, dict]):
    """Plotly: size vs WER and latency vs WER (latency alone when there is no reference)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = [v.key for v in VARIANTS if v.key in results]
    have_wer = all(results[k]["wer"] is not None for k in keys)
    y = [100 * results[k]["wer"] if have_wer else 0 for k in keys]
    labels = [SPECS[k].label for k in keys]
    colors = ["crimson" if k == "fp32" else "steelblue" for k in keys]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Size on disk vs WER", "Latency vs WER"))
    for col, xs, title in ((1, [results[k]["size_mb"] for k in keys], "size on disk (MB)"),
                           (2, [results[k]["latency_ms"] for k in keys], "median latency (ms)")):
        fig.add_trace(go.Scatter(x=xs, y=y, mode="markers+text", text=labels, textposition="top center",
                                 marker=dict(size=11, color=colors), showlegend=False), row=1, col=col)
        fig.update_xaxes(title_text=title, row=1, col=col)
        fig.update_yaxes(title_text="WER (%)" if have_wer else "(add a reference for WER)", row=1, col=col)
    fig.update_layout(height=420, margin=dict(l=40, r=20, t=50, b=40), title="Baseline in red")
    return fig


def write_csv(results: dict[str, dict], folder: str) -> str:
    path = os.path.join(folder, "edge_asr_results.csv")
    base = results.get("fp32")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "recipe", "algorithm", "transcript", "wer", "cer", "latency_ms", "rtf", "size_mb",
                    "compression_ratio", "speedup"])
        for key in [v.key for v in VARIANTS if v.key in results]:
            r = results[key]
            ratio, speedup = versus_baseline(base, r)
            w.writerow([SPECS[key].label, r["recipe"], r.get("algorithm", ""), r["transcript"], r["wer"], r["cer"],
                        round(r["latency_ms"], 2),
                        round(r["rtf"], 5), round(r["size_mb"], 4), "" if ratio is None else round(ratio, 3),
                        "" if speedup is None else round(speedup, 3)])
    return path


def friendly(err: Exception) -> str:
    """A message for the page: ours as they are; anything unexpected summarised (traceback to the log)."""
    if isinstance(err, EdgeASRError):
        return str(err)
    traceback.print_exc(file=sys.stderr)
    return f"Unexpected error ({type(err).__name__}): {err}. The app is still running; try again."


# ------------------------------------------------------------------------------------------ examples
def example_clips() -> list[dict]:
    path = ASSETS / "clips" / "clips.json"
    if not path.exists():
        return []
    return [dict(c, path=str(ASSETS / "clips" / c["file"])) for c in json.loads(path.read_text())]


def dataset_row(r: dict) -> list[str]:
    """One row of the Dataset tab from a benchmark row (keys as in compression.benchmark's results.json)."""
    delta = r.get("delta_wer_rel")
    delta = "—" if delta is None or math.isnan(delta) else f"{delta:+.1%}"
    return [r["variant"], r.get("algorithm") or "—", f"{r['size_mb']:.2f}", f"{r['compression']:.1f}x",
            f"{r['wer']:.2%}", delta,
            f"{r['cer']:.2%}", f"{r['latency_ms_median']:.0f}", f"{r['rtf']:.3f}", f"{r['speedup']:.2f}x"]


def precomputed_benchmark() -> tuple[list[list], str]:
    path = ASSETS / "benchmark" / "results.json"
    if not path.exists():
        return [], "No precomputed results are bundled yet: press the button to compute them."
    data = json.loads(path.read_text())
    rows = [dataset_row(r) for r in data["rows"]]
    meta = data.get("meta", {})
    return rows, (f"Precomputed by `edge-asr benchmark` on {meta.get('n_utterances', '?')} utterances "
                  f"({meta.get('audio_seconds', 0) / 60:.1f} min of audio), {meta.get('threads', '?')} threads.")


# ------------------------------------------------------------------------------------------ the page
def build_app(studio: Studio):
    import gradio as gr

    def enabled_recipes(values) -> dict[str, str]:
        """values: flat list [enabled, knob, algorithm] per variant (after fp32) -> {key: recipe} of enabled ones."""
        recipes = {"fp32": ""}
        for i, spec in enumerate(VARIANTS[1:]):
            on, knob, algo = values[3 * i: 3 * i + 3]
            if on:
                recipes[spec.key] = spec.recipe(knob, algo)
        return recipes

    def run_all(audio, reference, use_lm, *knobs, progress=gr.Progress()):
        try:
            samples = studio.load_clip(audio)
            recipes = enabled_recipes(knobs)
            results = {}
            for n, (key, recipe) in enumerate(recipes.items()):
                progress(n / len(recipes), desc=f"{SPECS[key].label}: compressing and timing")
                results[key] = studio.measure(recipe, samples, reference, use_lm)
            return outputs(results, reference, f"Ran {len(results)} variants on {len(samples) / SAMPLE_RATE:.1f} s "
                                                f"of audio ({studio.threads} threads, "
                                                f"{results['fp32']['decoding']} decoding).")
        except Exception as err:  # noqa: BLE001 - every failure becomes a message in the page
            return gr.update(), gr.update(), gr.update(), f"⚠️ {friendly(err)}", gr.update()

    def rerun_one(key, audio, reference, use_lm, results, on, knob, algo, progress=gr.Progress()):
        if not results:
            return gr.update(), gr.update(), gr.update(), "Press **Run all variants** first.", results
        try:
            results = dict(results)
            if not on:
                results.pop(key, None)
                return outputs(results, reference, f"{SPECS[key].label} switched off.")
            samples = studio.load_clip(audio)
            progress(0.2, desc=f"{SPECS[key].label}: compressing")
            start = time.perf_counter()
            results[key] = studio.measure(SPECS[key].recipe(knob, algo), samples, reference, use_lm)
            return outputs(results, reference, f"{SPECS[key].label} re-run with {results[key]['recipe']} in "
                                                f"{time.perf_counter() - start:.1f} s.")
        except Exception as err:  # noqa: BLE001
            return gr.update(), gr.update(), gr.update(), f"⚠️ {friendly(err)}", results

    def outputs(results, reference, message):
        return (table_rows(results, reference), figure(results), write_csv(results, studio.workdir), message,
                results)

    def dataset_recompute(use_lm, *knobs, progress=gr.Progress()):
        try:
            manifest = ASSETS / "clips" / "manifest.jsonl"
            utterances = load_utterances(str(manifest))
            rows, results = [], {}
            recipes = enabled_recipes(knobs)
            for n, (key, recipe) in enumerate(recipes.items()):
                progress(n / len(recipes), desc=f"{SPECS[key].label} on {len(utterances)} clips")
                variant = studio.variant(recipe)
                transcriber = Transcriber(variant.transcriber.model, studio.tokenizer,
                                          decoder=studio.decoder_for(variant, use_lm))
                with studio.lock:
                    r = evaluate(transcriber, utterances, threads=studio.threads, warmup=1, progress=False)
                results[key] = {**r, "size_mb": variant.bytes_on_disk / 1e6, "algorithm": variant.algorithm}
            base = results["fp32"]
            for key, r in results.items():
                rows.append(dataset_row({
                    **r, "variant": SPECS[key].label + (f" ({recipes[key]})" if recipes[key] else ""),
                    "compression": base["size_mb"] / r["size_mb"],
                    "delta_wer_rel": (r["wer"] - base["wer"]) / base["wer"] if base["wer"] else None,
                    "speedup": base["latency_ms_median"] / r["latency_ms_median"]}))
            return rows, f"Computed now on the {len(utterances)} bundled clips ({studio.threads} threads)."
        except Exception as err:  # noqa: BLE001
            return gr.update(), f"⚠️ {friendly(err)}"

    # API endpoints (gradio_client): /transcribe and /compare
    def api_transcribe(audio, recipe: str = "") -> dict:
        """Transcribe with one variant (recipe "" = baseline): transcript, latency, RTF, size."""
        try:
            return studio.measure(recipe or "", studio.load_clip(audio), None)
        except Exception as err:  # noqa: BLE001
            raise gr.Error(friendly(err)) from None

    def api_compare(audio, reference: str = "") -> list[dict]:
        """Every default-enabled variant on one clip: the results table as data."""
        try:
            samples = studio.load_clip(audio)
            out = []
            for spec in VARIANTS:
                if spec.enabled:
                    row = studio.measure(spec.recipe(spec.default), samples, reference or None)
                    out.append({"variant": spec.label, **row})
            for row in out:
                row["compression_ratio"], row["speedup"] = versus_baseline(out[0], row)
            return out
        except Exception as err:  # noqa: BLE001
            raise gr.Error(friendly(err)) from None

    examples = example_clips()
    with gr.Blocks(title="Edge ASR Studio") as demo:
        gr.Markdown("# Edge ASR Studio\nRecord or upload speech, or pick an example. The baseline Conformer-CTC and "
                    "its compressed variants transcribe it side by side; move a knob to re-compress that variant. "
                    f"Clips up to {studio.max_seconds:.0f} s; any rate, any channels. Each variant is built by its method's "
                    "*calibrated* algorithm (GPTQ, SparseGPT, activation-aware SVD, ... on "
                    f"{len(studio.stats.calibration)} bundled clips, statistics collected once at start-up) or its "
                    "*naive*, data-free twin: switch it per row.")
        results_state = gr.State({})
        with gr.Tab("Compare on a clip"):
            with gr.Row():
                with gr.Column(scale=3):
                    audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speech",
                                     elem_id="audio-input")
                    reference = gr.Textbox(label="Reference transcript (optional: WER and the diff need it)",
                                           elem_id="reference")
                    use_lm = gr.Checkbox(value=studio.lm_decoder is not None, interactive=studio.lm_decoder is not None,
                                         label="Beam search with the word language model (the same LM for every "
                                               "variant)" if studio.lm_decoder is not None else
                                               "Greedy decoding (this model folder has no lm.arpa.gz)",
                                         elem_id="use-lm")
                    if examples:
                        gr.Examples([[c["path"], c["text"]] for c in examples], [audio, reference],
                                    label="Bundled examples (LibriSpeech dev-clean, CC BY 4.0)")
                with gr.Column(scale=2):
                    controls = []
                    for spec in VARIANTS[1:]:
                        with gr.Row():
                            on = gr.Checkbox(value=spec.enabled, label=spec.label, elem_id=f"on-{spec.key}",
                                             scale=1, min_width=140)
                            if spec.knob:
                                knob = gr.Slider(spec.minimum, spec.maximum, value=spec.default, step=spec.step,
                                                 label=spec.knob, elem_id=f"knob-{spec.key}", scale=2)
                            else:
                                knob = gr.Number(value=None, visible=False)
                            algo = gr.Radio(list(ALGORITHMS), value="calibrated", label="algorithm",
                                            elem_id=f"algo-{spec.key}", scale=1, min_width=120)
                        controls.append((spec, on, knob, algo))
            run = gr.Button("Run all variants", variant="primary", elem_id="run")
            status = gr.Markdown(elem_id="status")
            table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "str", "html"] + ["str"] * 7, interactive=False,
                                 wrap=True, elem_id="results", label="Results",
                                 column_widths=["12%", "9%", "35%", "6%", "6%", "7%", "6%", "6%", "6%", "7%"])
            with gr.Row():
                plot = gr.Plot(label="Size and latency vs WER")
                csv_file = gr.File(label="Download the table (CSV)")
            knob_inputs = [c for _, on, knob, algo in controls for c in (on, knob, algo)]
            run.click(run_all, [audio, reference, use_lm, *knob_inputs], [table, plot, csv_file, status, results_state],
                      api_visibility="private")
            for spec, on, knob, algo in controls:
                handler = (lambda key: lambda *a, progress=gr.Progress(): rerun_one(key, *a, progress=progress))(spec.key)
                args = dict(fn=handler, inputs=[audio, reference, use_lm, results_state, on, knob, algo],
                            outputs=[table, plot, csv_file, status, results_state], api_visibility="private")
                on.input(**args)
                algo.input(**args)
                if spec.knob:
                    knob.release(**args)
        with gr.Tab("Dataset (class view)"):
            rows, note = precomputed_benchmark()
            gr.Markdown("Corpus-level WER of each variant: precomputed with `edge-asr benchmark` (see README), or "
                        "recomputed here on the bundled clips with the knobs of the first tab.")
            ds_status = gr.Markdown(note)
            ds_table = gr.Dataframe(value=rows or None, headers=["Variant", "Algorithm", "Size MB", "Ratio", "WER",
                                                                 "ΔWER rel",
                                                                 "CER", "Latency ms", "RTF", "Speed-up"],
                                    interactive=False, elem_id="dataset-results")
            recompute = gr.Button("Recompute on the bundled clips")
            recompute.click(dataset_recompute, [use_lm, *knob_inputs], [ds_table, ds_status], api_visibility="private")
        with gr.Tab("About the model"):
            card = Path(studio.model_dir) / "MODEL_CARD.md"
            gr.Markdown(card.read_text() if card.exists() else f"Model folder: `{studio.model_dir}`")
        # named API endpoints for gradio_client
        api_audio = gr.Audio(type="filepath", visible=False)
        api_text = gr.Textbox(visible=False)
        api_out = gr.JSON(visible=False)
        gr.Button(visible=False).click(api_transcribe, [api_audio, api_text], api_out, api_name="transcribe")
        gr.Button(visible=False).click(api_compare, [api_audio, api_text], api_out, api_name="compare")
    # One request at a time: on a 2-vCPU box two concurrent compress+measure jobs would halve each other's
    # speed, double peak memory and make every latency on the page wrong. Requests queue instead.
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-asr serve", description="Start the Edge ASR Studio web app.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 on Spaces/Docker)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--model", default=None, help="baseline model folder (default: the shipped one)")
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="longest clip accepted (s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-warm", action="store_true", help="do not build the default variants at start-up")
    parser.add_argument("--calib", default=None,
                        help="calibration audio (folder or manifest; default: the set in assets/calibration/)")
    args = parser.parse_args(argv)
    if os.environ.get("SYSTEM") == "spaces":
        args.host = "0.0.0.0"
    try:
        studio = Studio(args.model, threads=args.threads, max_seconds=args.max_seconds, calib=args.calib)
        print(f"calibrated in {studio.calibration_seconds:.1f} s: {studio.stats.describe()}", flush=True)
        if not args.no_warm:  # load once at start-up, not on the first request
            for spec in VARIANTS:
                if spec.enabled:
                    start = time.perf_counter()
                    studio.variant(spec.recipe(spec.default))
                    print(f"ready: {spec.label} ({time.perf_counter() - start:.1f} s)", flush=True)
    except EdgeASRError as err:
        print(f"edge-asr serve: error: {err}", file=sys.stderr)
        return 2
    build_app(studio).launch(server_name=args.host, server_port=args.port, share=args.share,
                             allowed_paths=[str(ASSETS)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
