"""Which int8 kernel is faster on this CPU for our model: torch.ao's dynamic quantized Linear or torchao's
int8 dynamic-activation/int8-weight? (compression/quantize.py uses the winner.)

    python experiments/int8_backends.py [--model DIR] [--threads 2] [--seconds 10]

Times one forward pass of the whole model on a clip of --seconds of features, median of 20 after warm-up.
Needs `pip install "torchao>=0.15,<0.19"` for the torchao row (optional; it is not a project dependency).
"""
import argparse
import copy
import statistics
import time
import warnings

import torch

from asr_core.checkpoint import load_model
from compression.artifact import to_runtime
from compression.compress import apply_recipe
from compression.recipe import parse_recipe


def timed(model, feats, lengths, repeats=20):
    with torch.inference_mode():
        for _ in range(3):
            model(feats, lengths)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(feats, lengths)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    frames = int(args.seconds * 100)
    feats, lengths = torch.randn(1, frames, model.cfg.features.n_mels), torch.tensor([frames])
    rows = [("fp32", timed(model, feats, lengths))]
    rows.append(("torch.ao dynamic int8 (ours)", timed(to_runtime(apply_recipe(model, parse_recipe("int8"))), feats,
                                                         lengths)))
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(ao, Int8DynamicActivationInt8WeightConfig(),
                      filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name != "head")
        rows.append(("torchao int8 dynamic act + int8 weight", timed(ao, feats, lengths)))
    except ImportError as err:
        rows.append((f"torchao unavailable ({err})", float("nan")))
    for name, ms in rows:
        print(f"{name:45s} {ms:8.1f} ms  ({rows[0][1] / ms:.2f}x vs fp32)")


if __name__ == "__main__":
    main()
