"""Does SmoothQuant-style scale migration (Xiao et al. 2022, arXiv 2211.10438) lower the int8 artifact's WER?

    python experiments/smoothquant_int8.py --alpha 0.5 --out /tmp/sq0.5
    edge-asr evaluate --model /tmp/sq0.5 --data dev100.jsonl --decoding greedy --threads 2

torch's and ONNX Runtime's dynamic int8 Linears round each input tensor with one scale, so a few large input
channels cost every other channel precision. SmoothQuant divides each channel of a LayerNorm's output by
s_j = max|X_j|^α / max|W_·j|^(1-α) and multiplies the next Linears' weight columns by s_j (the FP32 function is
unchanged). This folds s into the four LayerNorms of a block that feed Linears directly (attention q/k/v,
each FFN's first Linear, the convolution module's first pointwise), on the bundled calibration set, then
builds the shipped int8 recipe (GPTQ) on the smoothed model with statistics collected again.
Answer: docs/RESULTS.md, "How the calibrated algorithms were chosen" (not adopted).
"""
import argparse

import torch

from asr_core.checkpoint import load_model
from compression.artifact import save_artifact
from compression.calibration import collect_stats, load_calibration
from compression.compress import apply_recipe
from compression.recipe import parse_recipe


def smoothing_groups(model) -> list[tuple[torch.nn.LayerNorm, list[torch.nn.Linear]]]:
    """(LayerNorm, the Linears reading its output) of every block."""
    groups = []
    for block in model.blocks:
        groups.append((block.attn.norm, [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj]))
        groups += [(ffn.norm, [ffn.linear1]) for ffn in (block.ffn1, block.ffn2) if ffn is not None]
        if block.conv is not None:
            groups.append((block.conv.norm, [block.conv.pointwise1]))
    return groups


def channel_absmax(model, groups, calibration) -> dict[int, torch.Tensor]:
    """max |LayerNorm output| per channel over the calibration set, by id of the LayerNorm."""
    absmax = {id(norm): torch.zeros(norm.weight.numel()) for norm, _ in groups}

    def hook(module, _args, output):
        seen = absmax[id(module)]
        seen.copy_(torch.maximum(seen, output.detach().abs().flatten(0, -2).amax(0)))

    handles = [norm.register_forward_hook(hook) for norm, _ in groups]
    try:
        collect_stats(model, calibration)  # one pass over the set; its statistics are not needed here
    finally:
        for handle in handles:
            handle.remove()
    return absmax


@torch.no_grad()
def smooth(groups, absmax, alpha: float) -> None:
    for norm, linears in groups:
        w_max = torch.stack([linear.weight.abs().amax(0) for linear in linears]).amax(0)
        s = (absmax[id(norm)].clamp_min(1e-5) ** alpha / w_max.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
        norm.weight.div_(s)
        norm.bias.div_(s)
        for linear in linears:
            linear.weight.mul_(s)
        spread = absmax[id(norm)].max() / absmax[id(norm)].median()
        after = absmax[id(norm)] / s
        print(f"max/median channel range {spread:.1f} -> {after.max() / after.median():.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    model.eval()
    calibration = load_calibration()
    groups = smoothing_groups(model)
    smooth(groups, channel_absmax(model, groups, calibration), args.alpha)
    recipe = parse_recipe("int8")
    artifact = apply_recipe(model, recipe, stats=collect_stats(model, calibration))
    save_artifact(artifact, args.out, tokenizer, recipe.to_json())
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
