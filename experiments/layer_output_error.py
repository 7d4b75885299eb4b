"""How much does a recipe change each layer's output on calibration audio? The mean over compressed layers of
tr(E H Eᵀ) / tr(W H Wᵀ), E = Ŵ − W the weight change and H = E[x xᵀ] the layer's input second moment on the
bundled calibration set: the quantity the calibrated algorithms minimise, without decoding any speech.

    python experiments/layer_output_error.py kmeans:clusters=16,centroid_bits=16 kmeans:clusters=16

Used to check that storing row codebooks as 8-bit grids adds nothing that matters (RESULTS.md, "Huffman-coded
code streams and 8-bit row codebooks").
"""
from __future__ import annotations

import argparse

import torch

from asr_core.checkpoint import default_model_dir, load_model
from compression.artifact import to_runtime
from compression.calibrated import layer_stats
from compression.calibration import bundled_stats
from compression.compress import apply_recipe
from compression.methods import target_layers
from compression.recipe import parse_recipe


def runtime_weight(module: torch.nn.Module) -> torch.Tensor:
    """The float weight a runtime layer computes with (torch int8 layers dequantized)."""
    weight = module.weight() if callable(module.weight) else module.weight
    return (weight.dequantize() if weight.is_quantized else weight).detach().float()


def mean_output_error(base: torch.nn.Module, recipe_text: str, stats) -> tuple[float, int]:
    """(mean relative output error, layers counted) of one recipe; layers it reshapes are left out."""
    parsed = parse_recipe(recipe_text)
    modules = dict(to_runtime(apply_recipe(base, parsed, stats=stats)).named_modules())
    errors = []
    for name, layer in target_layers(base, parsed.skip):
        w0 = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
        hessian = layer_stats(stats, name, layer).hessian.float()
        if name not in modules or not hasattr(modules[name], "weight") or hessian.shape[0] != w0.shape[1]:
            continue
        e = runtime_weight(modules[name]).reshape(w0.shape) - w0
        errors.append(float(((e @ hessian) * e).sum() / ((w0 @ hessian) * w0).sum()))
    return sum(errors) / max(1, len(errors)), len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--model", default=default_model_dir())
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = load_model(args.model)
    stats = bundled_stats(base)
    for text in args.recipes:
        error, layers = mean_output_error(base, text, stats)
        print(f"{text}: mean relative output error {error:.7f} over {layers} layers")


if __name__ == "__main__":
    main()
