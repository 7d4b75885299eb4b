"""How long a calibrated build takes on the shipped model once the calibration statistics are collected.

    python scripts/build_timing.py [--threads 2] [RECIPE ...]

Collects the bundled set's statistics once (timed), then builds each recipe in turn with `apply_recipe` (no save,
no decode) and prints its time. A recipe built a second time at another knob value reuses what the first one
kept with the statistics (each layer's Hessian factor, k-means' sort), as the studio's knob changes do. To
compare two versions of the code, run it from a checkout of each, one after the other on an idle machine.
"""
import argparse
import time

import torch

DEFAULT = ("prune:sparsity=0.5", "prune:sparsity=0.55", "kmeans:clusters=16", "kmeans:clusters=17",
           "int4:group=64", "int4:group=80", "prune:sparsity=0.55+kmeans:clusters=16+int8")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("recipes", nargs="*", default=DEFAULT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from asr_core.checkpoint import load_model
    from compression.calibration import collect_stats, load_calibration
    from compression.compress import apply_recipe
    from compression.recipe import parse_recipe

    base, _ = load_model(args.model)
    start = time.perf_counter()
    stats = collect_stats(base, load_calibration())
    print(f"statistics: {stats.describe()}")
    for recipe in args.recipes:
        start = time.perf_counter()
        apply_recipe(base, parse_recipe(recipe), stats=stats)
        print(f"{recipe}: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
