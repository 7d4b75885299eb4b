"""Edge ASR Studio: the baseline Conformer-CTC and its compressed variants, side by side, in the browser.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--model DIR] [--max-seconds 120]

The page holds no model logic: :class:`studio.Studio` keeps the variants and measures them; each tab below is
built by its own function and turns what the studio returns into a table, a chart and a CSV. The same numbers
come from ``edge-asr compress`` and ``edge-asr evaluate``.
"""
from __future__ import annotations

import argparse
import csv
import functools
import html
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import jiwer

from asr_core.audio import SAMPLE_RATE
from asr_core.data import load_utterances
from asr_core.errors import EdgeASRError, SettingsError
from asr_core.evaluation import evaluate
from asr_core.text import normalize_text
from asr_core.transcribe import Transcriber
from compression.charts import tradeoff_figure
from compression.export import onnx_missing  # why the page's ONNX Runtime choice is off, or None
from compression.inspect import explain, explain_storage
from compression.inspect_figures import figures as class_figures
from compression.inspect_figures import sweep_figure
from studio import ALGORITHMS, MAX_SECONDS, RUNTIMES, SPECS, VARIANTS, LiveSession, Studio

ASSETS = Path(__file__).resolve().parent / "assets"


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
                 "RAM MB", "Ratio", "Speed-up"]
# the page's runtime choice -> the runtimes each variant row is measured on
RUNTIME_CHOICES = {"torch": ("torch",), "onnx": ("onnx",), "both": ("torch", "onnx")}
ONNX_SUFFIX = "@onnx"  # result key of a variant's ONNX Runtime row (the PyTorch row's key is the variant's)
PEER_PREFIX = "peer:"  # result keys of the peers (not ours), listed after our variants


def result_key(key: str, runtime: str) -> str:
    return key + ONNX_SUFFIX if runtime == "onnx" else key


def baseline_row(results: dict, runtime: str = "torch") -> dict | None:
    """What a row's ratio and speed-up are against: the baseline on the row's own runtime (a peer: the PyTorch
    baseline); None when that row is not on the page."""
    return results.get(result_key("fp32", runtime))


def versus_baseline(base: dict | None, row: dict) -> tuple[float | None, float | None]:
    """(compression ratio, speed-up) of a result row against the baseline row (None without a baseline)."""
    if not base:
        return None, None
    return base["size_mb"] / row["size_mb"], base["latency_ms"] / row["latency_ms"]


def row_keys(results: dict) -> list[str]:
    """Our variants in the page's order, each on PyTorch then ONNX Runtime; then the peers."""
    return ([k for v in VARIANTS for k in (v.key, v.key + ONNX_SUFFIX) if k in results]
            + sorted(k for k in results if k.startswith(PEER_PREFIX)))


def row_label(key: str, r: dict) -> str:
    if key.startswith(PEER_PREFIX):
        return f"{key[len(PEER_PREFIX):]} (peer, not ours)"
    spec = SPECS[key.removesuffix(ONNX_SUFFIX)]
    label = spec.label + (f" ({r['recipe']})" if r["recipe"] and spec.knob else "")
    return label + (f" · {RUNTIMES['onnx']}" if key.endswith(ONNX_SUFFIX) else "")


def table_rows(results: dict[str, dict], reference: str | None) -> list[list]:
    """Results keyed by variant -> display rows (ratio and speed-up against the baseline on the same runtime)."""
    rows = []
    for key in row_keys(results):
        r = results[key]
        fmt = lambda x, f: "—" if x is None else format(x, f)  # noqa: E731
        label = row_label(key, r)
        ratio, speedup = versus_baseline(baseline_row(results, r.get("runtime", "torch")), r)
        rows.append([label, r.get("algorithm") or "—", diff_html(reference, r["transcript"]), fmt(r["wer"], ".1%"),
                     fmt(r["cer"], ".1%"),
                     f"{r['latency_ms']:.0f}", f"{r['rtf']:.3f}", f"{r['size_mb']:.2f}", fmt(r.get("ram_mb"), ".0f"),
                     fmt(ratio, ".1f") + ("x" if ratio else ""), fmt(speedup, ".2f") + ("x" if speedup else "")])
    return rows


def figure(results: dict[str, dict]):
    """The shared size/latency-vs-WER figure (compression.charts) of the rows on the page."""
    keys = row_keys(results)
    return tradeoff_figure([row_label(k, results[k]) for k in keys], [results[k]["size_mb"] for k in keys],
                           [results[k]["latency_ms"] for k in keys], [results[k]["wer"] for k in keys],
                           [results[k].get("algorithm") or "" for k in keys])


def write_csv(results: dict[str, dict], folder: str) -> str:
    path = os.path.join(folder, "edge_asr_results.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "recipe", "algorithm", "runtime", "transcript", "wer", "cer", "latency_ms", "rtf",
                    "size_mb", "ram_mb", "compression_ratio", "speedup"])
        for key in row_keys(results):
            r = results[key]
            ratio, speedup = versus_baseline(baseline_row(results, r.get("runtime", "torch")), r)
            w.writerow([row_label(key, r), r["recipe"], r.get("algorithm", ""), r.get("runtime", "torch"),
                        r["transcript"], r["wer"], r["cer"], round(r["latency_ms"], 2), round(r["rtf"], 5),
                        round(r["size_mb"], 4), "" if r.get("ram_mb") is None else r["ram_mb"],
                        "" if ratio is None else round(ratio, 3),
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


# ------------------------------------------------------------------------------------------ handlers
def enabled_recipes(values) -> dict[str, str]:
    """values: flat list [enabled, knob, algorithm] per variant (after fp32) -> {key: recipe} of enabled ones."""
    recipes = {"fp32": ""}
    for i, spec in enumerate(VARIANTS[1:]):
        on, knob, algo = values[3 * i: 3 * i + 3]
        if on:
            recipes[spec.key] = spec.recipe(knob, algo)
    return recipes


def _outputs(studio: Studio, results, reference, message):
    return table_rows(results, reference), figure(results), write_csv(results, studio.workdir), message, results


def _unchanged(message: str, results=None):
    import gradio as gr

    return gr.update(), gr.update(), gr.update(), message, gr.update() if results is None else results


def _runtimes(choice) -> tuple[str, ...]:
    if choice not in RUNTIME_CHOICES:
        raise SettingsError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {choice!r}")
    return RUNTIME_CHOICES[choice]


def _measure_variant(studio: Studio, results: dict, key: str, recipe: str, samples, reference, use_lm, runtimes,
                     ram: bool) -> None:
    """Row ``key`` on each of ``runtimes`` into ``results`` (an ONNX row is exported on its first run)."""
    for runtime in runtimes:
        results[result_key(key, runtime)] = studio.measure(recipe, samples, reference, use_lm, runtime, ram)


def run_all(studio: Studio, audio, reference, use_lm, peers, runtime, ram, *knobs, progress=None):
    try:
        samples = studio.load_clip(audio)
        recipes, runtimes = enabled_recipes(knobs), _runtimes(runtime)
        results = {}
        for n, (key, recipe) in enumerate(recipes.items()):
            if progress is not None:
                what = "compressing, exporting and timing" if "onnx" in runtimes else "compressing and timing"
                progress(n / len(recipes), desc=f"{SPECS[key].label}: {what}")
            _measure_variant(studio, results, key, recipe, samples, reference, use_lm, runtimes, ram)
        for name in peers or []:
            results[PEER_PREFIX + name] = studio.measure_peer(name, samples, reference, ram)
        decoding = next(iter(results.values()))["decoding"]  # the baseline's row, on the first runtime
        where = " and ".join(RUNTIMES[r] for r in runtimes)
        return _outputs(studio, results, reference, f"Ran {len(results)} rows on {len(samples) / SAMPLE_RATE:.1f} s "
                        f"of audio ({studio.threads} threads, {where}, {decoding} decoding).")
    except Exception as err:  # noqa: BLE001 - every failure becomes a message in the page
        return _unchanged(f"⚠️ {friendly(err)}")


def rerun_one(studio: Studio, key, audio, reference, use_lm, runtime, ram, results, on, knob, algo, progress=None):
    if not results:
        return _unchanged("Press **Run all variants** first.", results)
    shown = results  # what the table shows: kept as it is when this re-run fails
    try:
        results = dict(results)
        for r in RUNTIMES:  # this row's old runs, on any runtime: none may stay at another knob
            results.pop(result_key(key, r), None)
        if not on:
            return _outputs(studio, results, reference, f"{SPECS[key].label} switched off.")
        samples = studio.load_clip(audio)
        if progress is not None:
            progress(0.2, desc=f"{SPECS[key].label}: compressing")
        start = time.perf_counter()
        recipe, runtimes = SPECS[key].recipe(knob, algo), _runtimes(runtime)
        _measure_variant(studio, results, key, recipe, samples, reference, use_lm, runtimes, ram)
        done = results[result_key(key, runtimes[0])]
        return _outputs(studio, results, reference, f"{SPECS[key].label} re-run with {done['recipe']} in "
                        f"{time.perf_counter() - start:.1f} s.")
    except Exception as err:  # noqa: BLE001
        return _unchanged(f"⚠️ {friendly(err)}", shown)


def dataset_recompute(studio: Studio, use_lm, *knobs, progress=None):
    """Every enabled variant on the bundled clips, measured as ``edge-asr evaluate`` does."""
    try:
        utterances = load_utterances(str(ASSETS / "clips" / "manifest.jsonl"))
        recipes, results = enabled_recipes(knobs), {}
        for n, (key, recipe) in enumerate(recipes.items()):
            if progress is not None:
                progress(n / len(recipes), desc=f"{SPECS[key].label} on {len(utterances)} clips")
            variant = studio.variant(recipe)
            transcriber = Transcriber(variant.transcriber.model, studio.tokenizer,
                                      decoder=studio.decoder_for(variant.transcriber, use_lm))
            with studio.lock:
                r = evaluate(transcriber, utterances, warmup=1, progress=False)
            results[key] = {**r, "size_mb": variant.bytes_on_disk / 1e6, "algorithm": variant.algorithm}
        base = results["fp32"]
        rows = [dataset_row({**r, "variant": SPECS[key].label + (f" ({recipes[key]})" if recipes[key] else ""),
                             "compression": base["size_mb"] / r["size_mb"],
                             "delta_wer_rel": (r["wer"] - base["wer"]) / base["wer"] if base["wer"] else None,
                             "speedup": base["latency_ms_median"] / r["latency_ms_median"]})
                for key, r in results.items()]
        return rows, f"Computed now on the {len(utterances)} bundled clips ({studio.threads} threads)."
    except Exception as err:  # noqa: BLE001
        import gradio as gr

        return gr.update(), f"⚠️ {friendly(err)}"


# ------------------------------------------------------------------------------------------ the class view
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]
FONT, PROJECTOR_FONT = 12, 18  # plot text, and in presentation mode
SWEEP_ON = ("this clip", "the bundled clips")
# Not drawn on page load (it would hold the shared queue for the time a variant takes to build): on the first
# knob moved or variant picked, or when the URL names a view.
PANEL_HINT = "Move a knob above, or pick a variant here: the panel explains it and shows what it did."


def knob_recipe(key: str, knobs) -> str:
    """The recipe of row ``key`` at the page's knob and algorithm (knobs: the flat [on, knob, algo] list)."""
    i = [s.key for s in VARIANTS[1:]].index(key)
    return SPECS[key].recipe(knobs[3 * i + 1], knobs[3 * i + 2])


def _clip_or_none(studio: Studio, audio):
    return studio.load_clip(audio) if audio else None


def explain_variant(studio: Studio, key, layer, audio, present, *knobs):
    """The "How it works" panel for one variant at its knob: layer choices, the explanation, four pictures and
    a status line. Outputs: [layer, text, histogram, layers, spectrum, frames, storage text, status]."""
    import gradio as gr

    try:
        recipe = knob_recipe(key, knobs)
        samples = _clip_or_none(studio, audio)
        try:
            report = studio.inspect(recipe, samples, layer or None)
        except SettingsError as err:
            if err.setting != "layer":
                raise
            report = studio.inspect(recipe, samples, None)  # a layer this variant does not have: its default
        figs = class_figures(report, PROJECTOR_FONT if present else FONT)
        spec = SPECS[key]
        text = (f"### {spec.label}: `{studio.recipe_key(recipe)}`\nPictures from {report['clip']}.\n\n"
                + explain(report, storage=False))
        spectrum = figs.get("spectrum")
        return (gr.update(choices=report["layer_names"], value=report["layer"]), text, figs["histogram"],
                figs["layers"], gr.update(value=spectrum, visible=spectrum is not None), figs.get("frames"),
                explain_storage(report),
                f"{spec.label}: pictures computed in {report['seconds']:.2f} s (cached with the variant).")
    except Exception as err:  # noqa: BLE001
        return (gr.update(),) * 7 + (f"⚠️ {friendly(err)}",)


def redraw(studio: Studio, key, layer, audio, present, *knobs):
    """Presentation mode switched: the panel redrawn at the new font size, if it shows anything yet."""
    import gradio as gr

    if not layer:  # nothing drawn yet: stay idle (the queue is shared with the measurements)
        return (gr.update(),) * 8
    return explain_variant(studio, key, layer, audio, present, *knobs)


def explain_after_knob(studio: Studio, key, shown, layer, audio, present, *knobs):
    """After a knob moved: the panel follows that row (same layer when it was already shown)."""
    return (key, *explain_variant(studio, key, layer if shown == key else None, audio, present, *knobs))


def bundled_clips() -> list[tuple]:
    from asr_core.audio import load_audio

    return [(load_audio(u.audio_path), u.text) for u in load_utterances(str(ASSETS / "clips" / "manifest.jsonl"))]


def run_sweep(studio: Studio, key, points, on, audio, reference, present, progress=None):
    """The knob of row ``key`` across its range, naive and calibrated, on this clip or the bundled ones: yields
    (chart, status) after every point, so the lines grow while it runs."""
    import gradio as gr

    try:
        spec = SPECS[key]
        if on == SWEEP_ON[1]:
            clips, clips_key = bundled_clips(), "bundled"
        else:
            if not audio:
                yield gr.update(), "Upload, record or pick a clip first (or sweep on the bundled clips)."
                return
            samples = studio.load_clip(audio)
            clips = [(samples, reference or None)]
            clips_key = f"{studio.digest(samples)}:{normalize_text(reference or '')}"
        for out in studio.sweep_steps(spec, int(points), clips, clips_key):
            done = len(out["points"])
            if progress is not None:
                progress(done / out["total"], desc=f"{spec.label}: {done} of {out['total']} points")
            fig = sweep_figure(out["points"], out["knob"], out["label"], PROJECTOR_FONT if present else FONT,
                               baseline=out["baseline"])
            scored = "the baseline's own transcript (no reference given)" if out["vs_baseline"] else "the reference"
            verb = "points in" if done == out["total"] else f"of {out['total']} points so far,"
            yield fig, (f"{done} {verb} {out['seconds']:.1f} s ({out['cached']} already computed); greedy WER "
                        f"against {scored}, on {on}.")
    except Exception as err:  # noqa: BLE001
        yield gr.update(), f"⚠️ {friendly(err)}"

def api_transcribe(studio: Studio, audio, recipe: str = "") -> dict:
    """Transcribe with one variant (recipe "" = baseline): transcript, latency, RTF, size."""
    import gradio as gr

    try:
        return studio.measure(recipe or "", studio.load_clip(audio), None)
    except Exception as err:  # noqa: BLE001
        raise gr.Error(friendly(err)) from None


def api_compare(studio: Studio, audio, reference: str = "") -> list[dict]:
    """Every default-enabled variant on one clip: the results table as data."""
    import gradio as gr

    try:
        samples = studio.load_clip(audio)
        out = [{"variant": spec.label, **studio.measure(spec.recipe(spec.default), samples, reference or None)}
               for spec in VARIANTS if spec.enabled]
        for row in out:
            row["compression_ratio"], row["speedup"] = versus_baseline(out[0], row)
        return out
    except Exception as err:  # noqa: BLE001
        raise gr.Error(friendly(err)) from None


LIVE_LIMIT_SECONDS = 600  # a stream longer than this is stopped with a message (memory stays bounded anyway)


def _live_status(session: LiveSession | None, note: str = "") -> str:
    if session is None or session.last is None:
        return note or "Press **Record** and speak: captions appear as you talk."
    u = session.last
    return (f"{session.label}: heard {u.audio_seconds:.1f} s · last update decoded {u.window_seconds:.1f} s of audio "
            f"in {1000 * u.decode_seconds:.0f} ms (RTF {u.rtf:.2f}) · captions trail speech by about "
            f"{session.engine.settings.step_seconds + u.decode_seconds:.1f} s{' · ' + note if note else ''}")


def live_step(studio: Studio, session, chunk, variant_key, use_lm):
    """One streamed microphone chunk -> (session, captions, status). A new variant or LM choice mid-stream keeps
    the lines committed so far and goes on with the new model."""
    try:
        if chunk is None:
            return session, gr_update(), _live_status(session)
        spec = SPECS.get(variant_key, SPECS["fp32"])
        recipe = spec.recipe(spec.default)
        note = ""
        if session is None or session.key != (studio.recipe_key(recipe), bool(use_lm)):
            earlier = []
            if session is not None:
                session.finish()
                earlier = session.captions().splitlines()
                note = f"switched to {spec.label}"
            session = LiveSession(studio, recipe, bool(use_lm))
            session.earlier = earlier
        rate, samples = chunk
        session.add(rate, samples)  # queued: the session's worker decodes
        if session.last is not None and session.last.audio_seconds > LIVE_LIMIT_SECONDS:
            return session, session.captions(), f"⚠️ Live sessions stop at {LIVE_LIMIT_SECONDS // 60} minutes: " \
                                                 "stop and record again to go on."
        return session, session.captions(), _live_status(session, note)
    except Exception as err:  # noqa: BLE001 - a message in the page; the next chunk is still answered
        return None, gr_update(), f"⚠️ {friendly(err)}"


def live_stop(studio: Studio, session):
    """Recording stopped (or the stream broke off mid-word): commit what is left."""
    try:
        if session is None:
            return None, gr_update(), "Nothing was recorded."
        session.finish()
        return None, session.captions(), _live_status(session, "stopped: all text committed")
    except Exception as err:  # noqa: BLE001
        return None, gr_update(), f"⚠️ {friendly(err)}"


def gr_update():
    import gradio as gr

    return gr.update()


# ------------------------------------------------------------------------------------------ URL state
# Presentation mode: the page's text sizes are theme variables declared on :root, so a class on <html> that
# redefines them scales every label, slider and table at once; plots are redrawn with larger fonts.
CSS = """
html.present { --text-xxs: 12px; --text-xs: 14px; --text-sm: 17px; --text-md: 21px; --text-lg: 25px;
               --text-xl: 30px; --text-xxl: 38px; }
html.present .gradio-container { max-width: 100% !important; }
html.present #intro, html.present .hide-in-present { display: none !important; }
html.present .plot-row { flex-direction: column !important; }
"""
PRESENT_JS = "(on) => { document.documentElement.classList.toggle('present', !!on); return []; }"


def url_fields(controls, method, layer, present, runtime, ram) -> list[tuple[str, object, object]]:
    """(query name, component, default) of everything the URL keeps: every row's on/off, knob and algorithm,
    the class view's variant and layer, presentation mode, the runtime and the RAM column. Only values off
    their default are written."""
    fields = []
    for spec, on, knob, algo in controls:
        fields.append((f"{spec.key}.on", on, spec.enabled))
        if spec.knob:
            fields.append((spec.key, knob, spec.default))
        fields.append((f"{spec.key}.algo", algo, ALGORITHMS[0]))
    return fields + [("view", method, "prune"), ("layer", layer, None), ("present", present, False),
                     ("runtime", runtime, "torch"), ("ram", ram, False)]


def url_js(fields) -> str:
    """Client-side only: the fields' values -> the page's query string (history.replaceState, no reload)."""
    spec = json.dumps([[name, "" if default is None else str(default).lower()] for name, _, default in fields])
    return f"""(...values) => {{
        const fields = {spec};
        const q = new URLSearchParams();
        fields.forEach(([name, fallback], i) => {{
            let v = values[i];
            if (v === null || v === undefined || v === "") return;
            v = typeof v === "number" ? String(+v.toFixed(4)) : String(v).toLowerCase();
            if (v !== fallback) q.set(name, v);
        }});
        const query = q.toString();
        window.history.replaceState(null, "", window.location.pathname + (query ? "?" + query : ""));
        return [];
    }}"""


def _from_query(name: str, text: str, default):
    """One query value parsed as its field's type; None when it is not valid (the control keeps its value)."""
    if isinstance(default, bool):
        return {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}.get(text.lower())
    if name.endswith(".algo"):
        return text if text in ALGORITHMS else None
    if name == "view":
        return text if text in SPECS and text != "fp32" else None
    if name == "layer":
        return text
    if name == "runtime":  # ONNX Runtime only where the page offers it (the onnx extra installed)
        return text if text in RUNTIME_CHOICES and (text == "torch" or not onnx_missing()) else None
    spec = SPECS[name]
    try:
        value = float(text)
    except ValueError:
        return None
    if not spec.minimum <= value <= spec.maximum:
        return None
    return int(value) if float(spec.step).is_integer() else value


def url_state(fields, query: dict) -> list:
    """The page's query parameters -> an update per field (unchanged where absent or invalid)."""
    import gradio as gr

    updates = []
    for name, _, default in fields:
        value = _from_query(name, query[name], default) if name in query else None
        updates.append(gr.update() if value is None else gr.update(value=value))
    return updates


# ------------------------------------------------------------------------------------------ the page
def _with_progress(fn, studio: Studio, n_inputs: int, *bound):
    """A gradio handler calling ``fn(studio, *bound, *inputs, progress=...)`` with the page's progress bar.

    Gradio injects its bar only into a *positional* parameter whose default is ``gr.Progress()`` (a keyword-only
    one after ``*args`` is never filled), so the handler declares ``n_inputs`` positional inputs and then it."""
    import inspect

    import gradio as gr

    def handler(*args):
        *inputs, progress = args
        return fn(studio, *bound, *inputs, progress=progress)
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    handler.__signature__ = inspect.Signature(
        [inspect.Parameter(f"input_{i}", positional) for i in range(n_inputs)]
        + [inspect.Parameter("progress", positional, default=gr.Progress())])
    handler.__name__ = fn.__name__
    return handler


def _clip_inputs(studio: Studio):
    import gradio as gr

    audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speech", elem_id="audio-input")
    reference = gr.Textbox(label="Reference transcript (optional: WER and the diff need it)", elem_id="reference")
    has_lm = studio.lm_decoder is not None
    use_lm = gr.Checkbox(value=has_lm, interactive=has_lm, elem_id="use-lm",
                         label="Beam search with the word language model (the same LM for every variant)" if has_lm
                         else "Greedy decoding (this model folder has no lm.arpa.gz)")
    examples = example_clips()
    if examples:
        gr.Examples([[c["path"], c["text"]] for c in examples], [audio, reference],
                    label="Bundled examples (LibriSpeech dev-clean, CC BY 4.0)")
    return audio, reference, use_lm


def _variant_controls():
    """One row per compressed variant: on/off, its knob, calibrated/naive. Returns [(spec, on, knob, algo)]."""
    import gradio as gr

    controls = []
    for spec in VARIANTS[1:]:
        with gr.Row():
            on = gr.Checkbox(value=spec.enabled, label=spec.label, elem_id=f"on-{spec.key}", scale=1, min_width=140)
            if spec.knob:
                knob = gr.Slider(spec.minimum, spec.maximum, value=spec.default, step=spec.step, label=spec.knob,
                                 elem_id=f"knob-{spec.key}", scale=2)
            else:
                knob = gr.Number(value=None, visible=False)
            algo = gr.Radio(list(ALGORITHMS), value="calibrated", label="algorithm", elem_id=f"algo-{spec.key}",
                            scale=1, min_width=120)
        controls.append((spec, on, knob, algo))
    return controls


def _peer_choice():
    """Optional reference rows: the systems a user would pick instead (absent, with a note, without the extra)."""
    import gradio as gr

    from asr_core.peers import available_peers

    ready = [name for name, why in available_peers().items() if not why]
    missing = [f"{name}: {why}" for name, why in available_peers().items() if why]
    return gr.CheckboxGroup(ready, value=[], label="Peers, not ours (measured the same way)",
                            info="; ".join(missing) or None, elem_id="peers")


def _run_settings():
    """Where each row runs (PyTorch, ONNX Runtime or both) and whether its RAM is measured."""
    import gradio as gr

    why = onnx_missing()
    runtime = gr.Radio([("PyTorch", "torch"), ("ONNX Runtime", "onnx"), ("Both", "both")], value="torch",
                       label="Runtime", interactive=why is None, elem_id="runtime",
                       info=f"ONNX Runtime {why}" if why else "ONNX Runtime: each variant is exported once (about "
                       "10 s) with its own int8/int4 codes and run as the torch-free device runner runs it")
    ram = gr.Checkbox(False, label="RAM MB: peak resident memory of each variant, measured in a fresh process "
                      "(1-3 s more per new variant)", elem_id="ram")
    return runtime, ram


def compare_tab(studio: Studio, present):
    """The clip, the variant rows, the results table, chart and CSV, the class view; returns what the other tabs
    and the page's URL state reuse."""
    import gradio as gr

    results_state = gr.State({})
    with gr.Row(elem_classes="plot-row"):  # stacked in presentation mode, like the plots
        with gr.Column(scale=3):
            audio, reference, use_lm = _clip_inputs(studio)
        with gr.Column(scale=2):
            controls = _variant_controls()
            peers = _peer_choice()
            runtime, ram = _run_settings()
    run = gr.Button("Run all variants", variant="primary", elem_id="run")
    status = gr.Markdown(elem_id="status")
    table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "str", "html"] + ["str"] * 8, interactive=False,
                         wrap=True, elem_id="results", label="Results",
                         column_widths=["12%", "9%", "32%", "6%", "6%", "7%", "5%", "6%", "6%", "5%", "6%"])
    with gr.Row():
        plot = gr.Plot(label="Size and latency vs WER")
        csv_file = gr.File(label="Download the table (CSV)", elem_classes="hide-in-present")
    knob_inputs = [c for _, on, knob, algo in controls for c in (on, knob, algo)]
    outputs = [table, plot, csv_file, status, results_state]
    run_inputs = [audio, reference, use_lm, peers, runtime, ram, *knob_inputs]
    run.click(_with_progress(run_all, studio, len(run_inputs)), run_inputs, outputs, api_visibility="private")
    view = class_view(studio, audio, reference, knob_inputs, present)
    for spec, on, knob, algo in controls:
        row_inputs = [audio, reference, use_lm, runtime, ram, results_state, on, knob, algo]
        args = dict(fn=_with_progress(rerun_one, studio, len(row_inputs), spec.key), inputs=row_inputs,
                    outputs=outputs, api_visibility="private")
        follow = dict(fn=functools.partial(explain_after_knob, studio, spec.key),
                      inputs=[view["method"], view["layer"], audio, present, *knob_inputs],
                      outputs=[view["method"], *view["outputs"]], api_visibility="private")
        on.input(**args)
        algo.input(**args).then(**follow)
        if spec.knob:
            knob.release(**args).then(**follow)
    return use_lm, knob_inputs, controls, view, (runtime, ram)


def class_view(studio: Studio, audio, reference, knob_inputs, present) -> dict:
    """"How it works": one variant at its knob explained (method, formula, what is stored, the algorithm) and
    shown (weights before/after, layer by layer, singular values, the clip frame by frame), and a sweep of its
    knob. Follows the last knob moved; returns its components for the page's other events."""
    import gradio as gr

    with gr.Accordion("How it works: what each method did, explained and shown", open=True, elem_id="class-view"):
        with gr.Row():
            method = gr.Dropdown([(v.label, v.key) for v in VARIANTS[1:]], value="prune", elem_id="how-variant",
                                 label="Variant (at its knob and algorithm above)", scale=2)
            layer = gr.Dropdown([], value=None, label="Layer", elem_id="how-layer", scale=3,
                                allow_custom_value=True)
        how_status = gr.Markdown(PANEL_HINT, elem_id="how-status")
        text = gr.Markdown(latex_delimiters=LATEX, elem_id="how-text")
        with gr.Row(elem_classes="plot-row"):
            hist = gr.Plot(label="Weights before and after", elem_id="plot-hist")
            bars = gr.Plot(label="Layer by layer", elem_id="plot-layers")
        with gr.Row(elem_classes="plot-row"):
            spectrum = gr.Plot(label="Singular values", elem_id="plot-spectrum", visible=False)
            frames = gr.Plot(label="The clip frame by frame", elem_id="plot-frames")
        storage = gr.Markdown(latex_delimiters=LATEX, elem_id="how-storage")
        with gr.Row():
            points = gr.Slider(3, 20, value=10, step=1, label="sweep points", elem_id="sweep-points", scale=2)
            on = gr.Radio(list(SWEEP_ON), value=SWEEP_ON[0], label="measured on", elem_id="sweep-on", scale=2)
            sweep = gr.Button("Sweep this variant's knob (naive and calibrated)", elem_id="sweep", scale=1)
        sweep_status = gr.Markdown(elem_id="sweep-status")
        sweep_plot = gr.Plot(label="WER and size across the knob", elem_id="plot-sweep")
    outputs = [layer, text, hist, bars, spectrum, frames, storage, how_status]
    shown = functools.partial(explain_variant, studio)
    method.input(lambda key, *a: shown(key, None, *a), [method, audio, present, *knob_inputs], outputs,
                 api_visibility="private")
    layer.input(shown, [method, layer, audio, present, *knob_inputs], outputs, api_visibility="private")
    present.change(functools.partial(redraw, studio), [method, layer, audio, present, *knob_inputs], outputs,
                   api_visibility="private")

    def sweep_handler(key, n, where, clip, text, big, progress=gr.Progress()):  # positional: gradio finds it
        yield from run_sweep(studio, key, n, where, clip, text, big, progress=progress)

    sweep.click(sweep_handler, [method, points, on, audio, reference, present], [sweep_plot, sweep_status],
                api_visibility="private")
    return {"method": method, "layer": layer, "outputs": outputs, "show": shown,
            "inputs": [method, layer, audio, present, *knob_inputs]}


def dataset_tab(studio: Studio, use_lm, knob_inputs) -> None:
    import gradio as gr

    rows, note = precomputed_benchmark()
    gr.Markdown("Corpus-level WER of each variant: precomputed with `edge-asr benchmark` (see docs/RESULTS.md), "
                "or recomputed here on the bundled clips with the knobs of the first tab.")
    status = gr.Markdown(note)
    table = gr.Dataframe(value=rows or None, headers=["Variant", "Algorithm", "Size MB", "Ratio", "WER", "ΔWER rel",
                                                      "CER", "Latency ms", "RTF", "Speed-up"],
                         interactive=False, elem_id="dataset-results")
    recompute = gr.Button("Recompute on the bundled clips")
    recompute.click(_with_progress(dataset_recompute, studio, 1 + len(knob_inputs)), [use_lm, *knob_inputs],
                    [table, status], api_visibility="private")


def model_card(model_dir: str) -> str:
    """The folder's MODEL_CARD.md without its Hugging Face metadata header (the page shows the text)."""
    card = Path(model_dir) / "MODEL_CARD.md"
    if not card.exists():
        return f"Model folder: `{model_dir}` (no MODEL_CARD.md)"
    text = card.read_text()
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        text = text[4:].split("\n---\n", 1)[1]
    return text.lstrip()


def live_tab(studio: Studio) -> None:
    """The browser microphone streamed into one variant (Gradio's own Record button starts it)."""
    import gradio as gr

    with gr.Row():
        variant = gr.Dropdown([(v.label, v.key) for v in VARIANTS], value="fp32", label="Variant (at its default "
                              "knob, calibrated)", elem_id="live-variant", scale=2)
        has_lm = studio.lm_decoder is not None
        use_lm = gr.Checkbox(value=has_lm, interactive=has_lm, label="word LM", elem_id="live-lm", scale=1)
    audio = gr.Audio(sources=["microphone"], streaming=True, type="numpy", label="Microphone",
                     elem_id="live-audio")
    captions = gr.Textbox(label="Live captions", lines=10, max_lines=20, interactive=False,
                          elem_id="live-captions", autoscroll=True)
    status = gr.Markdown(_live_status(None), elem_id="live-status")
    session = gr.State(None)
    audio.stream(functools.partial(live_step, studio), [session, audio, variant, use_lm], [session, captions, status],
                 stream_every=0.5, time_limit=LIVE_LIMIT_SECONDS + 30, api_visibility="private")
    audio.stop_recording(functools.partial(live_stop, studio), [session], [session, captions, status],
                         api_visibility="private")


def about_tab(studio: Studio) -> None:
    import gradio as gr

    gr.Markdown(model_card(studio.model_dir))


def api_endpoints(studio: Studio) -> None:
    """Named endpoints for gradio_client: /transcribe and /compare."""
    import gradio as gr

    audio, text, out = gr.Audio(type="filepath", visible=False), gr.Textbox(visible=False), gr.JSON(visible=False)
    gr.Button(visible=False).click(functools.partial(api_transcribe, studio), [audio, text], out,
                                   api_name="transcribe")
    gr.Button(visible=False).click(functools.partial(api_compare, studio), [audio, text], out, api_name="compare")


def page_state(demo, controls, view, present, settings) -> None:
    """URL state both ways (the query string sets the controls on load; every change rewrites it, client-side),
    presentation mode's class on <html>, and the class view drawn once the page has its settings."""
    import gradio as gr

    fields = url_fields(controls, view["method"], view["layer"], present, *settings)
    components = [c for _, c, _ in fields]

    asked = gr.State(False)  # whether the URL named a view: only then is the panel drawn on load

    def from_url(request):
        query = dict(request.query_params) if request is not None else {}
        return [*url_state(fields, query), "view" in query or "layer" in query]
    from_url.__annotations__ = {"request": gr.Request}  # gradio injects the request by this (a real class, not
    # the string `from __future__ import annotations` would leave)

    def show_if_asked(wanted, *inputs):
        return view["show"](*inputs) if wanted else (gr.update(),) * len(view["outputs"])

    demo.load(from_url, None, [*components, asked], api_visibility="private").then(
        show_if_asked, [asked, *view["inputs"]], view["outputs"], api_visibility="private")
    gr.on([c.change for c in components], fn=None, inputs=components, js=url_js(fields))
    present.change(fn=None, inputs=[present], js=PRESENT_JS)


def build_app(studio: Studio):
    import gradio as gr

    with gr.Blocks(title="Edge ASR Studio") as demo:
        present = gr.Checkbox(False, label="Presentation mode (larger text for a projector)", elem_id="present")
        gr.Markdown("# Edge ASR Studio\nRecord or upload speech, or pick an example. The baseline Conformer-CTC and "
                    "its compressed variants transcribe it side by side; move a knob to re-compress that variant. "
                    f"Clips up to {studio.max_seconds:.0f} s; any rate, any channels. Each variant is built by its "
                    "method's *calibrated* algorithm (GPTQ, SparseGPT, activation-aware SVD, ... on "
                    f"{len(studio.stats.calibration)} bundled clips, statistics collected once at start-up) or its "
                    "*naive*, data-free twin: switch it per row. *How it works*, below the table, explains and "
                    "shows what the last variant you moved did; the address bar keeps the knobs, so a prepared "
                    "setting opens as it was.", elem_id="intro")
        with gr.Tab("Compare on a clip"):
            use_lm, knob_inputs, controls, view, settings = compare_tab(studio, present)
        with gr.Tab("Live"):
            live_tab(studio)
        with gr.Tab("Dataset"):
            dataset_tab(studio, use_lm, knob_inputs)
        with gr.Tab("About the model"):
            about_tab(studio)
        api_endpoints(studio)
        page_state(demo, controls, view, present, settings)
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
    import torch

    torch.set_num_threads(args.threads)  # once, for every variant the page measures
    try:
        studio = Studio(args.model, max_seconds=args.max_seconds, calib=args.calib)
        print(f"calibrated in {studio.calibration_seconds:.1f} s: {studio.stats.describe()}", flush=True)
        if not args.no_warm:  # load once at start-up, not on the first request
            for spec in VARIANTS:
                if spec.enabled:
                    start = time.perf_counter()
                    studio.variant(spec.recipe(spec.default))
                    print(f"ready: {spec.label} ({time.perf_counter() - start:.1f} s)", flush=True)
    except EdgeASRError as err:
        print(f"edge-asr: error: {err}", file=sys.stderr)
        return 2
    build_app(studio).launch(server_name=args.host, server_port=args.port, share=args.share,
                             allowed_paths=[str(ASSETS)], css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
