"""What the class view costs on the shipped model: a knob change with its pictures, and a sweep of one knob.

    python scripts/class_view_timing.py [--clip assets/clips/1272-135031-0000.opus] [--threads 2]
                                        [--sweep prune] [--points 10]

Uses studio.Studio, the object behind the page: a knob change is Studio.measure (compress, save, load, decode
four times) followed by Studio.inspect and the figures (the pictures); the sweep is Studio.sweep, naive and
calibrated, on the clip, then once more to show the cached points. The browser's drawing is not included.
"""
import argparse
import json
import time

import torch

import studio as app
from asr_core.audio import SAMPLE_RATE
from compression.inspect_figures import figures, sweep_figure

KNOBS = (("prune", 0.7), ("kmeans", 64), ("int4", 128), ("structured", 0.5), ("svd", 0.8), ("combined", 0.6))


def knob_changes(studio, samples, reference, knobs=KNOBS):
    start = time.perf_counter()
    studio._clip_capture(samples)  # the baseline's run with every layer's input kept: once per clip
    print(f"baseline capture of the clip (once per clip, with the first picture): {time.perf_counter() - start:.2f} s")
    for key, value in knobs:
        for algorithm in app.ALGORITHMS:
            recipe = app.SPECS[key].recipe(value, algorithm)
            start = time.perf_counter()
            studio.measure(recipe, samples, reference)
            measured = time.perf_counter() - start
            report = studio.inspect(recipe, samples)
            start = time.perf_counter()
            figs = figures(report)
            payload = sum(len(f.to_json()) for f in figs.values())
            drawn = time.perf_counter() - start
            print(f"knob change {key}={value} ({algorithm}): {measured:.1f} s table row + {report['seconds']:.2f} s "
                  f"report + {drawn:.2f} s figures ({payload / 1e3:.0f} kB of plotly JSON) = "
                  f"{measured + report['seconds'] + drawn:.1f} s")


def sweep(studio, samples, reference, key, points):
    spec = app.SPECS[key]
    clips = [(samples, reference)]
    out = studio.sweep(spec, points, clips, "timing")
    for p in out["points"]:
        print(f"  {spec.knob}={p['value']:g} {p['family']:10s} WER {100 * p['wer']:5.1f}%  {p['size_mb']:6.2f} MB  "
              f"built in {p['build_seconds']:.1f} s")
    families = {f: sum(p["build_seconds"] for p in out["points"] if p["family"] == f) for f in app.ALGORITHMS}
    print(f"sweep {key}, {len(out['points']) // 2} knob values x naive and calibrated: {out['seconds']:.1f} s "
          f"(builds: calibrated {families['calibrated']:.1f} s, naive {families['naive']:.1f} s)")
    again = studio.sweep(spec, points, clips, "timing")
    print(f"the same sweep again: {again['seconds']:.3f} s ({again['cached']} points cached)")
    sweep_figure(out["points"], out["knob"], out["label"], baseline=out["baseline"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", default=str(app.ASSETS / "clips" / "1272-135031-0000.opus"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--sweep", default="prune", help="comma-separated rows to sweep (default prune)")
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--no-knobs", action="store_true", help="only the sweep")
    parser.add_argument("--defaults", action="store_true",
                        help="move each row to its default knob value instead of the harsh ones in KNOBS")
    parser.add_argument("--as-served", action="store_true",
                        help="first build the default rows, as `python app.py` does at start-up (untimed), then move "
                             "each knob one step from its default: a teacher's first slider move on a served page")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    studio = app.Studio(args.model)
    print(f"start-up: {time.perf_counter() - start:.1f} s (calibration {studio.calibration_seconds:.1f} s)")
    samples = studio.load_clip(args.clip)
    clips = json.loads((app.ASSETS / "clips" / "clips.json").read_text())
    reference = next((c["text"] for c in clips if args.clip.endswith(c["file"])), None)
    print(f"clip: {len(samples) / SAMPLE_RATE:.1f} s, {args.threads} threads, reference {'yes' if reference else 'no'}")
    if not args.no_knobs:
        knobs = [(k, app.SPECS[k].default) for k, _ in KNOBS] if args.defaults else KNOBS
        if args.as_served:
            start = time.perf_counter()
            for spec in app.VARIANTS:
                if spec.enabled:
                    studio.variant(spec.recipe(spec.default))
            print(f"default rows built (the page's start-up): {time.perf_counter() - start:.1f} s")
            knobs = [(k, min(app.SPECS[k].maximum, app.SPECS[k].default + app.SPECS[k].step)) for k, _ in KNOBS]
        knob_changes(studio, samples, reference, knobs)
    for key in filter(None, args.sweep.split(",")):
        sweep(studio, samples, reference, key, args.points)


if __name__ == "__main__":
    main()
