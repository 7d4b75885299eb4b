"""How long the studio takes on a clip: "Run all variants" from a cold cache, then one knob change.

    python scripts/app_timing.py [--clip assets/clips/1272-135031-0000.opus] [--threads 2]

Uses studio.Studio, the object behind the page, so the figures are those of the page minus the browser round trip.
"""
import argparse
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
    start = time.perf_counter()
    studio = app.Studio(args.model)
    print(f"start-up (load baseline, calibration statistics {studio.calibration_seconds:.1f} s of it): "
          f"{time.perf_counter() - start:.1f} s")
    samples = studio.load_clip(args.clip)
    print(f"clip: {len(samples) / SAMPLE_RATE:.1f} s, {args.threads} threads")
    for label, cold in (("run all variants, cold cache (compress + measure)", True),
                        ("run all variants, warm cache (as after start-up)", False)):
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


if __name__ == "__main__":
    main()
