"""The studio's table with the runtime set to "Both" and the RAM column on: every default variant on PyTorch and
on ONNX Runtime, on one clip, with what the first run (export + RAM measurement) and a repeat cost.

    python scripts/app_runtimes.py [--clip assets/clips/1272-135031-0000.opus] [--threads 2]

Uses studio.Studio, the object behind the page (the figures are the page's minus the browser round trip). One
clip: its latencies are noisier than the benchmark's corpus medians (`edge-asr benchmark --runtime torch onnx`).
"""
import argparse
import json
import time

import torch

import studio as app
from asr_core.audio import SAMPLE_RATE


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", default=str(app.ASSETS / "clips" / "1272-135031-0000.opus"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    studio = app.Studio(args.model)
    samples = studio.load_clip(args.clip)
    clips = json.loads((app.ASSETS / "clips" / "clips.json").read_text())
    reference = next((c["text"] for c in clips if args.clip.endswith(c["file"])), None)
    print(f"clip: {len(samples) / SAMPLE_RATE:.1f} s, {args.threads} threads, greedy decoding")
    print("| variant | runtime | size MB | RAM MB | latency ms | WER | first run s | repeat s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    base_ms = None
    for spec in app.VARIANTS:
        if not spec.enabled:
            continue
        recipe = spec.recipe(spec.default)
        studio.variant(recipe)  # built first: the "first run" below is export + timing + RAM, not compression
        for runtime in app.RUNTIMES:
            start = time.perf_counter()
            studio.measure(recipe, samples, reference, use_lm=False, runtime=runtime, ram=True)
            first = time.perf_counter() - start
            start = time.perf_counter()
            row = studio.measure(recipe, samples, reference, use_lm=False, runtime=runtime, ram=True)
            repeat = time.perf_counter() - start
            base_ms = base_ms or row["latency_ms"]
            wer = "-" if row["wer"] is None else f"{row['wer']:.1%}"
            print(f"| {recipe or 'fp32'} | {app.RUNTIMES[runtime]} | {row['size_mb']:.1f} | {row['ram_mb']:.0f} | "
                  f"{row['latency_ms']:.0f} ({row['latency_ms'] / base_ms:.2f}x) | {wer} | {first:.1f} | "
                  f"{repeat:.1f} |", flush=True)


if __name__ == "__main__":
    main()
