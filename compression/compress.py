"""Apply a recipe to a model, optionally fine-tune to recover accuracy, report per layer, save."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn
from tqdm import tqdm

from asr_core.errors import SettingsError
from asr_core.model import ConformerCTC

from .artifact import encode_model, to_runtime
from .methods import LowRankLinear, apply_method
from .recipe import Recipe


def apply_recipe(model: ConformerCTC, recipe: Recipe, progress: bool = False) -> ConformerCTC:
    """A trainable compressed copy of ``model`` (the original is left untouched)."""
    if any(type(m).__module__.startswith("torch.ao") for m in model.modules()):
        raise SettingsError("this model is already a compressed artifact with int8 layers; compress the trained "
                            "checkpoint instead")
    model = copy.deepcopy(model).float()
    for method, settings in tqdm(recipe.steps, desc="compressing", disable=not progress):
        start = time.perf_counter()
        apply_method(model, method, settings, recipe.skip, recipe.only)
        if progress:
            tqdm.write(f"  {method}: {time.perf_counter() - start:.2f} s")
    return model


def finetune(model: ConformerCTC, tokenizer, train_utts, dev_utts, *, steps: int | None = None,
             minutes: float | None = None, lr: float = 1e-4, batch_seconds: float = 90.0, device: str = "auto",
             freeze_layers: int = 0, progress: bool = True) -> dict:
    """Recovery fine-tuning through the one training loop of asr_core. Constraints (masks, codebooks,
    straight-through quantizers) are parametrizations, so every step honours them. ``freeze_layers``: keep the stem
    and the first K blocks fixed and dropout-free, as the model was trained (a frozen pretrained encoder never saw
    dropout; training it here wrecks its features)."""
    from asr_core.training import TrainConfig, train

    cfg = TrainConfig(lr=lr, warmup_steps=min(50, max(1, (steps or 100) // 10)), max_steps=steps,
                      max_minutes=minutes, batch_seconds=batch_seconds, eval_every=10 ** 9, dev_limit=None,
                      device=device, final_lr_ratio=0.1, precision="fp32", freeze_layers=freeze_layers)
    summary = train(model, tokenizer, train_utts, dev_utts, cfg, out_dir=None, progress=progress)
    model.cpu().eval()
    return summary


def _dense(module: nn.Module) -> torch.Tensor:
    """Float weight of a Linear, a LowRankLinear or a torch int8 Linear."""
    if isinstance(module, LowRankLinear):
        return _dense(module.up) @ _dense(module.down)
    weight = module.weight
    weight = weight() if callable(weight) else weight
    return weight.dequantize().float() if weight.is_quantized else weight.detach().float()


def layer_report(original: ConformerCTC, compressed: ConformerCTC) -> list[dict]:
    """Per compressed layer: parameters, bytes before (fp32) / after (stored), relative weight error."""
    tensors, manifest = encode_model(compressed)
    runtime = to_runtime(compressed)
    rows = []
    orig_modules = dict(original.named_modules())
    names = set(manifest["layers"]) | set(manifest["lowrank"])
    for lr_name in manifest["lowrank"]:
        names -= {f"{lr_name}.down", f"{lr_name}.up"}
    for name in sorted(names, key=list(dict(compressed.named_modules())).index):
        prefixes = (f"{name}.weight.", f"{name}.down.weight.", f"{name}.up.weight.", f"{name}.down.weight",
                    f"{name}.up.weight", f"{name}.bias", f"{name}.up.bias")
        stored = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(prefixes))
        before = orig_modules.get(name)
        row = {"layer": name, "encoding": "lowrank" if name in manifest["lowrank"] else
               manifest["layers"][name]["encoding"] + ("+int8" if manifest["layers"][name]["int8_runtime"]
                                                        and manifest["layers"][name]["encoding"] != "int8" else "")}
        if before is not None and hasattr(before, "weight"):
            w0 = before.weight.detach().float()
            w1 = _dense(runtime.get_submodule(name)).reshape(-1, *w0.shape[1:])
            n = w0.numel() + (before.bias.numel() if before.bias is not None else 0)
            row.update(params=n, bytes_before=4 * n, bytes_after=stored,
                       rel_error=float((w1 - w0).norm() / w0.norm().clamp_min(1e-12)) if w1.shape == w0.shape
                       else float("nan"))
        else:
            row.update(params=None, bytes_before=None, bytes_after=stored, rel_error=float("nan"))
        rows.append(row)
    return rows


def format_report(rows: list[dict]) -> str:
    lines = [f"{'layer':40s} {'encoding':14s} {'params':>9s} {'bytes fp32':>11s} {'bytes now':>10s} {'ratio':>6s} "
             f"{'rel err':>8s}"]
    for r in rows:
        ratio = r["bytes_before"] / r["bytes_after"] if r["bytes_before"] and r["bytes_after"] else float("nan")
        lines.append(f"{r['layer']:40s} {r['encoding']:14s} {r['params'] or 0:9,d} {r['bytes_before'] or 0:11,d} "
                     f"{r['bytes_after']:10,d} {ratio:6.2f} {r['rel_error']:8.4f}")
    return "\n".join(lines)
