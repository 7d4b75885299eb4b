"""ONNX Runtime latency of exported folders against torch FP32's, each alone in a process; where time goes.

    python scripts/onnx_latency.py --clip assets/clips/251-118436-0000.opus onnx_fp32 onnx_int8 [--profile]

Every measurement runs alone in a fresh process (median of ``--runs`` after two warm-ups, 2 threads), the
shipped torch FP32 model and the target alternating process by process (``--rounds`` pairs; the ratio is of
the medians): two ONNX sessions in one process were not measured fairly (the first-built one came out 10-15%
faster whichever it was), and neither was torch beside a session, whose idle threads spin-wait and took the
cores from it (torch FP32 187-235 ms interleaved with ONNX runs in one process, 139-173 ms alone).
``--profile`` adds ONNX Runtime's own per-operator time, summed by operator type (of the last round). A
``torch:DIR`` entry times a torch model folder (an artifact) the same way.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
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


BASELINE = "torch:"  # the shipped model, torch FP32


def child(clip: str, target: str, runs: int, threads: int, profile: bool) -> dict:
    """Median ms of ``runs`` runs of one target after two warm-ups, alone in this process."""
    import torch

    torch.set_num_threads(threads)
    model, x, lengths = _features(clip)
    if target == BASELINE:
        run, session = _torch_runner(model, x, lengths), None
    else:
        del model
        run, session = _runner(target, x, lengths, threads, profile)
    for _ in range(2):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    result = {"target": target, "ms": round(1e3 * statistics.median(times), 1), "frames": int(x.shape[1])}
    if profile and session is not None:
        result["ops"] = [(op, round(ms / (runs + 2), 2), n // (runs + 2)) for op, ms, n in _op_times(session)]
    return result


def _absolute(target: str) -> str:
    """``target`` with its folder made absolute: the child runs in the repository, not the caller's folder."""
    if target == BASELINE:
        return target
    if target.startswith("torch:"):
        return "torch:" + os.path.abspath(target[len("torch:"):])
    return os.path.abspath(target)


def _in_own_process(target: str, args) -> dict | str:
    """child()'s result from a fresh process, or the last line of its error."""
    target = _absolute(target)
    command = [sys.executable, os.path.abspath(__file__), "--child", target, "--clip", os.path.abspath(args.clip),
               "--runs", str(args.runs), "--threads", str(args.threads), *(["--profile"] if args.profile else [])]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if run.returncode != 0:
        return (run.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("targets", nargs="+", help="ONNX model folders (or torch:DIR for a torch model folder)")
    p.add_argument("--clip", default=os.path.join(REPO, "assets", "clips", "251-118436-0000.opus"))
    p.add_argument("--runs", type=int, default=11, help="timed runs in each process")
    p.add_argument("--rounds", type=int, default=3, help="torch FP32 / target process pairs per target")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="ONNX Runtime's time per operator type")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.clip, args.targets[0], args.runs, args.threads, args.profile)))
        return 0
    for target in args.targets:
        pairs = [(_in_own_process(BASELINE, args), _in_own_process(target, args)) for _ in range(args.rounds)]
        failed = next((r for pair in pairs for r in pair if isinstance(r, str)), None)
        if failed is not None:
            print(f"{target}: failed: {failed}")
            continue
        fp32 = statistics.median(b["ms"] for b, _ in pairs)
        ms = statistics.median(t["ms"] for _, t in pairs)
        rounds = ", ".join(f"{t['ms']:.0f}/{b['ms']:.0f}" for b, t in pairs)
        print(f"{target}: {ms:.1f} ms, torch FP32 {fp32:.1f} ms: {ms / fp32:.2f}x "
              f"({pairs[0][1]['frames']} frames; rounds, target/torch ms: {rounds})")
        for op, op_ms, n in pairs[-1][1].get("ops", [])[:12]:
            print(f"    {op:26s} {op_ms:7.2f} ms a run  ({n} nodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
