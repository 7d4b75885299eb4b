"""Resident memory a model variant costs: load a model folder and transcribe one clip in a fresh process.
Peers (``runtime="peer"``, the folder being the peer's name) are measured the same way: their library is the
runtime, their model the load.

What is measured (Linux, from ``/proc/self/status``), in a new Python process per call so nothing else that
the caller holds is counted:

1. the runtime's libraries are imported and the clip is read and resampled: torch + asr_core (and the
   compression package, for artifacts) for ``runtime="torch"``; only numpy, soundfile, soxr, onnxruntime and
   the torch-free asr_core modules for ``runtime="onnx"`` (what :mod:`asr_core.lite` loads). Its resident set
   then is ``baseline_mb``, reported but not charged to the model;
2. the peak counter is reset (``5`` into ``/proc/self/clear_refs``, Linux 4.0+), so earlier transients do not
   count; the model folder is loaded: ``load_mb`` = resident set after loading - baseline;
3. one clip is transcribed (greedy decoding, so no LM is loaded), twice (the first run allocates the
   runtime's thread pools and scratch buffers): ``peak_mb`` = the high-water mark since the reset (VmHWM,
   loading and both runs included) - baseline. That is the "RAM MB" of a variant.

When the counter cannot be reset, ``hwm_reset`` is False and the peak counts from process start (imports
rarely peak above what they leave resident, but then it is an upper bound). Shared library pages count as
resident where they are touched, as on a device. Memory-mapped weights count once read.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .errors import SettingsError

RUNTIMES = ("torch", "onnx", "peer")  # "peer": ``folder`` names a peer engine (asr_core.peers.PEERS)
PEER_LIBRARIES = {"whisper-tiny.en": "faster_whisper", "pocketsphinx": "pocketsphinx"}
CLIP_SECONDS = 6.0  # the latency clip of the benchmarks


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _clip(clip: str | None):
    """The clip's samples (16 kHz float32), or CLIP_SECONDS of a voiced synthetic signal: memory depends on the
    length, not on the words."""
    import numpy as np

    from .audio import load_audio

    if clip:
        return load_audio(clip)
    t = np.arange(int(CLIP_SECONDS * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.7 * t)) / 16000
    return (0.3 * sum(np.sin(k * phase) / k for k in range(1, 8))).astype(np.float32)


def _prepare(runtime: str, folder: str, threads: int, low_memory: bool = False):
    """Import what ``runtime`` needs; return a function that loads ``folder`` and returns ``transcribe``."""
    if runtime == "peer":
        import importlib

        from .peers import load_peer

        importlib.import_module(PEER_LIBRARIES[folder])  # the engine's library: runtime cost, as torch's is
        return lambda: load_peer(folder, threads).transcribe
    if runtime == "onnx":
        from .lite import LiteTranscriber

        return lambda: LiteTranscriber.from_folder(folder, threads=threads, decoding="greedy",
                                                   low_memory=low_memory).transcribe
    import torch

    from . import checkpoint, transcribe

    kind = checkpoint.folder_format(folder)
    if kind != checkpoint.CHECKPOINT:  # the format's loader module: library cost, not model cost
        checkpoint.format_loaders()[kind].load()
    torch.set_num_threads(threads)

    def load():
        model, tokenizer = checkpoint.load_model(folder)
        return transcribe.Transcriber(model, tokenizer).transcribe
    return load


def child(folder: str, runtime: str, clip: str | None, threads: int, low_memory: bool = False) -> dict:
    """Steps 1-3 of the module docstring, in this process; returns the figures in MB."""
    load = _prepare(runtime, folder, threads, low_memory)
    samples = _clip(clip)
    baseline = _status_kb("VmRSS")
    reset = _reset_peak()
    transcribe = load()
    loaded = _status_kb("VmRSS")
    load_peak = _status_kb("VmHWM")
    text = transcribe(samples)
    transcribe(samples)
    peak = _status_kb("VmHWM")
    mb = 1024.0
    return {"runtime": runtime, "model": folder, "threads": threads, "baseline_mb": round(baseline / mb, 1),
            "load_mb": round((loaded - baseline) / mb, 1), "load_peak_mb": round((load_peak - baseline) / mb, 1),
            "peak_mb": round((peak - baseline) / mb, 1), "hwm_reset": reset,
            "clip_seconds": round(len(samples) / 16000, 2), "torch_imported": "torch" in sys.modules, "text": text}


def peak_rss_mb(folder: str, runtime: str = "torch", clip: str | None = None, threads: int = 2,
                timeout: float = 600, low_memory: bool = False) -> dict:
    """Run :func:`child` in a fresh ``python -m asr_core.memory --child`` process -> {baseline_mb, load_mb,
    load_peak_mb, peak_mb, hwm_reset, torch_imported, ...}. ``runtime="onnx"`` needs an exported ONNX folder;
    ``low_memory``: ONNX Runtime without weight prepacking (:func:`asr_core.onnx_model.make_session`)."""
    if runtime not in RUNTIMES:
        raise SettingsError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "peer" and folder not in PEER_LIBRARIES:
        raise SettingsError(f"unknown peer {folder!r}: one of {', '.join(PEER_LIBRARIES)}")
    if runtime != "peer" and not os.path.isdir(folder):
        raise SettingsError(f"model folder not found: {folder}")
    command = [sys.executable, "-m", "asr_core.memory", "--child", "--model", folder, "--runtime", runtime,
               "--threads", str(threads), *(["--clip", clip] if clip else []),
               *(["--low-memory"] if low_memory else [])]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SettingsError(f"memory measurement of {folder} ({runtime}) took over {timeout:g} s and was stopped") \
            from None
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise SettingsError(f"memory measurement of {folder} ({runtime}) failed: {last}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m asr_core.memory",
                                description="Peak resident memory of loading a model folder and running one clip "
                                            "(fresh process; MB above the runtime's own imports).")
    p.add_argument("--model", required=True, help="model folder (with --runtime peer: a peer's name)")
    p.add_argument("--runtime", default="torch", choices=RUNTIMES)
    p.add_argument("--clip", default=None, help=f"audio file (default: {CLIP_SECONDS:g} s synthetic)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--low-memory", action="store_true", help="onnx: no weight prepacking")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.runtime, args.clip, args.threads, args.low_memory)))
    else:
        print(json.dumps(peak_rss_mb(args.model, args.runtime, args.clip, args.threads,
                                     low_memory=args.low_memory), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
