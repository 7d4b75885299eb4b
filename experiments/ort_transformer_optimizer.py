"""Does ONNX Runtime's transformer optimizer (its fused Gelu / SkipLayerNorm / Attention kernels) speed up the
exported baseline on a CPU?

    edge-asr export --out /tmp/base.onnx
    python experiments/ort_transformer_optimizer.py /tmp/base.onnx [--clip assets/clips/...opus]

Optimizes MODEL_DIR/model.onnx with `onnxruntime.transformers.optimizer` (model type "bert": the encoder blocks
are pre-norm transformer layers with convolutions between), checks the outputs still agree, then times torch
FP32, the exported graph and the optimized graph on one clip, interleaved, 2 threads, greedy-free (the acoustic
model only). Answer: docs/RESULTS.md, "ONNX Runtime".
"""
import argparse
import glob
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.transformers import optimizer

from asr_core.audio import load_audio
from asr_core.checkpoint import load_model
from asr_core.config import FeatureConfig
from asr_core.features import log_mel


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("onnx_dir")
    parser.add_argument("--clip", default=sorted(glob.glob("assets/clips/*.opus"))[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = os.path.join(args.onnx_dir, "model.onnx")
    model, _ = load_model()
    cfg = model.cfg
    fused = optimizer.optimize_model(source, model_type="bert", num_heads=cfg.n_heads, hidden_size=cfg.d_model,
                                     opt_level=1, use_gpu=False)
    print("fused:", {k: v for k, v in fused.get_fused_operator_statistics().items() if v})
    optimized = os.path.join(tempfile.mkdtemp(), "optimized.onnx")
    fused.save_model_to_file(optimized)
    feats = log_mel(load_audio(args.clip), FeatureConfig())
    x, n = feats[None].numpy().astype(np.float32), np.array([feats.shape[0]], dtype=np.int64)
    plain, tuned = session(source, args.threads), session(optimized, args.threads)
    names = [i.name for i in plain.get_inputs()]
    feed = dict(zip(names, (x, n)))
    print(f"largest output difference, optimized vs exported: "
          f"{float(np.abs(plain.run(None, feed)[0] - tuned.run(None, feed)[0]).max()):.1e}")
    runs = {"torch FP32": lambda: model(torch.from_numpy(x), torch.from_numpy(n)),
            "ONNX Runtime, exported": lambda: plain.run(None, feed),
            "ONNX Runtime, transformer optimizer": lambda: tuned.run(None, feed)}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        for run in runs.values():
            run(), run()
        for _ in range(args.rounds):
            for k, run in runs.items():
                start = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - start)
    base = np.median(times["torch FP32"])
    print(f"clip {feats.shape[0] / 100:.1f} s, {args.threads} threads, median of {args.rounds}")
    for k, v in times.items():
        print(f"{k}: {1000 * np.median(v):.0f} ms ({np.median(v) / base:.2f}x torch)")


if __name__ == "__main__":
    main()
