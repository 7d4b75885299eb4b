"""Data-parallel scaling on this machine: the same training run as one process and as N torchrun processes, one
torch thread each, and (for reference) one process with N threads. Prints audio seconds trained per wall
second of each and the ratios, measured in one invocation so the machine's load is shared alike.

    .venv/bin/python scripts/ddp_scaling.py --data ../shared/data/librispeech-mini/train-clean-5 --limit 300

The configurations run interleaved, ``--repeats`` rounds of each (the machine's load drifts), and the median of
each is compared. Each run decodes its audio once (N processes decode N disjoint shares) and trains ``--steps`` optimizer steps of
``--batch-seconds`` per process; the figure is the run's own ``audio_sec_per_sec`` (audio summed over ranks,
over the training wall time, data loading included).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_args(args, out: str, threads: int) -> list[str]:
    return ["train", "--data", args.data, "--limit", str(args.limit), "--out", out, "--preset", args.preset,
            "--max-steps", str(args.steps), "--batch-seconds", str(args.batch_seconds), "--warmup-steps", "10",
            "--eval-every", str(10 * args.steps), "--save-every", str(10 * args.steps), "--threads", str(threads)]


def run(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=300, help="training utterances (default 300)")
    parser.add_argument("--preset", default="s")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-seconds", type=float, default=60.0, help="per process (default 60)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every configuration")
    args = parser.parse_args()
    torchrun = Path(sys.executable).parent / "torchrun"
    speeds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            configs = {"1 process x 1 thread": [sys.executable, "-m", "asr_core", *train_args(args, f"{tmp}/a{round_}", 1)],
                       f"{args.nproc} processes x 1 thread": [str(torchrun), "--standalone", "--nproc_per_node",
                                                              str(args.nproc), "-m", "asr_core",
                                                              *train_args(args, f"{tmp}/b{round_}", 1)],
                       f"1 process x {args.nproc} threads": [sys.executable, "-m", "asr_core",
                                                             *train_args(args, f"{tmp}/c{round_}", args.nproc)]}
            for name, cmd in configs.items():
                summary = run(cmd)
                speeds.setdefault(name, []).append(summary["audio_sec_per_sec"])
                print(f"round {round_ + 1} {name:>24}: {summary['audio_sec_per_sec']:7.1f} audio s/s  "
                      f"({summary['audio_seconds']:.0f} s of audio in {summary['train_seconds']:.1f} s, "
                      f"{summary['step']} steps, data wait {summary['data_wait_fraction']:.0%})", flush=True)
    base = statistics.median(speeds["1 process x 1 thread"])
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"{name:>24}: median {median:7.1f} audio s/s = {median / base:.2f}x of 1 process x 1 thread")
    print(f"(cpu count {os.cpu_count()}, preset {args.preset}, {args.batch_seconds:g} s per process per step, "
          f"{args.steps} steps, {args.repeats} rounds)")

if __name__ == "__main__":
    main()
