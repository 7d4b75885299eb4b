"""How long the studio takes on a clip: "Run all variants" from a cold cache, then one knob change; or, with
``--runtimes``, the table with the runtime set to "Both" and the RAM column on.

    python scripts/app_timing.py [--clip assets/clips/1272-135031-0000.opus] [--threads 2] [--runtimes]

Uses studio.Studio, the object behind the page, so the figures are those of the page minus the browser round trip.
``--runtimes``: every default variant on PyTorch and on ONNX Runtime, greedy, with size, RAM, latency and WER on
the clip, and what a row's first run (ONNX export + timing + RAM measurement of a variant already built) and a
repeat cost. One clip: its latencies are noisier than the benchmark's corpus medians (`edge-asr benchmark
--runtime both`).
"""
import argparse
import json
import time

import torch

import studio as app
from asr_core.audio import SAMPLE_RATE


def timings(studio, samples) -> None:
    for label in ("run all variants, cold cache (compress + measure)", "run all variants, warm cache (as after "
                  "start-up)"):
        start = time.perf_counter()
        for spec in app.VARIANTS:
            if spec.enabled:
                studio.measure(spec.recipe(spec.default), samples, None)
        print(f"{label}: {time.perf_counter() - start:.1f} s")
    for key, value in (("prune", 0.7), ("kmeans", 64), ("int4", 128), ("structured", 0.5), ("svd", 0.8),
                       ("combined", 0.6)):
        for algorithm in app.ALGORITHMS:
            start = time.perf_counter()
            studio.measure(app.SPECS[key].recipe(value, algorithm), samples, None)
            print(f"knob change {key}={value} ({algorithm}): {time.perf_counter() - start:.1f} s")


def runtimes_table(studio, samples, reference) -> None:
    print("| variant | runtime | size MB | RAM MB | latency ms | WER | first run s | repeat s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    base_ms = None
    for spec in app.VARIANTS:
        if not spec.enabled:
            continue
        recipe = spec.recipe(spec.default)
        studio.variant(recipe)  # built first: the "first run" below is export + timing + RAM, not compression
        for runtime in app.RUNTIMES:
            seconds = []
            for _ in range(2):
                start = time.perf_counter()
                row = studio.measure(recipe, samples, reference, use_lm=False, runtime=runtime, ram=True)
                seconds.append(time.perf_counter() - start)
            base_ms = base_ms or row["latency_ms"]
            wer = "-" if row["wer"] is None else f"{row['wer']:.1%}"
            print(f"| {recipe or 'fp32'} | {app.RUNTIMES[runtime]} | {row['size_mb']:.1f} | {row['ram_mb']:.0f} | "
                  f"{row['latency_ms']:.0f} ({row['latency_ms'] / base_ms:.2f}x) | {wer} | {seconds[0]:.1f} | "
                  f"{seconds[1]:.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", default=str(app.ASSETS / "clips" / "1272-135031-0000.opus"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--runtimes", action="store_true", help="the PyTorch / ONNX Runtime table with RAM instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    studio = app.Studio(args.model)
    print(f"start-up (load baseline, calibration statistics {studio.calibration_seconds:.1f} s of it): "
          f"{time.perf_counter() - start:.1f} s")
    samples = studio.load_clip(args.clip)
    print(f"clip: {len(samples) / SAMPLE_RATE:.1f} s, {args.threads} threads")
    if args.runtimes:
        clips = json.loads((app.ASSETS / "clips" / "clips.json").read_text())
        runtimes_table(studio, samples, next((c["text"] for c in clips if args.clip.endswith(c["file"])), None))
    else:
        timings(studio, samples)


if __name__ == "__main__":
    main()
