"""ONNX Runtime latency of exported folders as a ratio to torch FP32 in the same process, and where its time goes.

    python scripts/onnx_latency.py --clip assets/clips/251-118436-0000.opus onnx_fp32 onnx_int8 [--profile]

Each folder runs in its own fresh process beside the shipped torch FP32 model, the two interleaved run by run
(median of ``--runs`` after two warm-ups, 2 threads): two ONNX sessions in one process were not measured
fairly (the first-built one came out 10-15% faster whichever it was). ``--profile`` adds ONNX Runtime's own
per-operator time, summed by operator type. A ``torch:DIR`` entry times a torch model folder (an artifact) the
same way.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _features(clip: str):
    import torch

    from asr_core.audio import load_audio
    from asr_core.checkpoint import load_model
    from asr_core.features import log_mel

    model, _ = load_model()
    x = log_mel(load_audio(clip), model.cfg.features).unsqueeze(0)
    return model.eval(), x, torch.tensor([x.shape[1]])


def _torch_runner(model, x, lengths):
    import torch

    def run():
        with torch.inference_mode():
            model(x, lengths)
    return run


def _runner(target: str, x, lengths, threads: int, profile: bool):
    """A no-argument function running ``target`` on (x, lengths) once; and its ORT session (None for torch)."""
    if target.startswith("torch:"):
        from asr_core.checkpoint import load_model

        return _torch_runner(load_model(target[len("torch:"):])[0].eval(), x, lengths), None
    from asr_core.onnx_model import make_session  # the session the runtime itself builds

    prefix = os.path.join("/tmp", f"onnx_latency_{os.getpid()}") if profile else None
    session = make_session(os.path.join(target, "model.onnx"), threads, profile_prefix=prefix)
    feed = {"features": x.numpy(), "lengths": lengths.numpy()}
    return (lambda: session.run(None, feed)), session


def _op_times(session) -> list[tuple[str, float, int]]:
    """(op type, ms summed over the runs, node executions) from ORT's profile, largest first."""
    path = session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"] / 1e3
            count[event["args"]["op_name"]] += 1
    return [(op, ms, count[op]) for op, ms in total.most_common()]


def child(clip: str, target: str, runs: int, threads: int, profile: bool) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    model, x, lengths = _features(clip)
    run_fp32 = _torch_runner(model, x, lengths)
    run_target, session = _runner(target, x, lengths, threads, profile)
    times = {"torch": [], "target": []}
    for _ in range(2):
        run_fp32(), run_target()
    for _ in range(runs):
        for key, run in (("torch", run_fp32), ("target", run_target)):
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    fp32, other = float(np.median(times["torch"])), float(np.median(times["target"]))
    result = {"target": target, "torch_fp32_ms": round(1e3 * fp32, 1), "ms": round(1e3 * other, 1),
              "ratio": round(other / fp32, 3), "frames": int(x.shape[1])}
    if profile and session is not None:
        result["ops"] = [(op, round(ms / (runs + 2), 2), n // (runs + 2)) for op, ms, n in _op_times(session)]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("targets", nargs="+", help="ONNX model folders (or torch:DIR for a torch model folder)")
    p.add_argument("--clip", default=os.path.join(REPO, "assets", "clips", "251-118436-0000.opus"))
    p.add_argument("--runs", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="ONNX Runtime's time per operator type")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.clip, args.targets[0], args.runs, args.threads, args.profile)))
        return 0
    for target in args.targets:
        command = [sys.executable, os.path.abspath(__file__), "--child", target, "--clip", args.clip,
                   "--runs", str(args.runs), "--threads", str(args.threads), *(["--profile"] if args.profile else [])]
        run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if run.returncode != 0:
            print(f"{target}: failed: {(run.stderr.strip().splitlines() or ['no output'])[-1]}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{target}: {r['ms']:.1f} ms, torch FP32 {r['torch_fp32_ms']:.1f} ms in the same run: "
              f"{r['ratio']:.2f}x ({r['frames']} frames)")
        for op, ms, n in r.get("ops", [])[:12]:
            print(f"    {op:26s} {ms:7.2f} ms a run  ({n} nodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
