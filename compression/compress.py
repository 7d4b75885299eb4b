"""Apply a recipe to a model, optionally fine-tune to recover accuracy, report per layer, save."""
from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch import nn
from tqdm import tqdm

from asr_core.errors import SettingsError
from asr_core.model import ConformerCTC

from .artifact import decode_model, encode_model
from .calibration import (CalibrationStats, accumulate, block_inputs, bundled_stats, calibrated_layers,
                          collect_stats)
from .methods import LowRankLinear, apply_method, is_calibrated, target_layers
from .quantize import is_int8_runtime
from .recipe import Recipe


RESHAPING = ("structured", "svd")  # methods after which the old statistics no longer fit the layers


def apply_recipe(model: ConformerCTC, recipe: Recipe, progress: bool = False, stats: CalibrationStats | None = None,
                 sequential: bool = False) -> ConformerCTC:
    """A trainable compressed copy of ``model`` (the original is left untouched).

    ``stats``: the model's calibration statistics (:func:`compression.calibration.collect_stats`), reused across
    recipes; when a calibrated step needs them and none are given, they are collected on the bundled set. A step
    after one that reshaped layers (structured, svd) is calibrated on the output of the steps before it
    (statistics re-collected on the partly compressed model). ``sequential``: GPTQ's "true sequential" mode --
    every block is calibrated on what the blocks before it, already compressed, give it, and every step of a
    chain on the output of the steps before it (slower: about one calibration pass per step).
    """
    if any(is_int8_runtime(m) for m in model.modules()):
        raise SettingsError("this model is already a compressed artifact with int8 layers; compress the trained "
                            "checkpoint instead")
    if stats is None and any(is_calibrated(s) for _, s in recipe.steps):
        stats = bundled_stats(model)
    model = copy.deepcopy(model).float()
    stale = False
    for method, settings in tqdm(recipe.steps, desc="compressing", disable=not progress):
        start = time.perf_counter()
        if is_calibrated(settings) and stale:
            stats = collect_stats(model, stats.calibration)
            stale = False
        if sequential and is_calibrated(settings) and method != "structured" and recipe.only is None:
            apply_block_by_block(model, method, settings, recipe.skip, stats)
            stale = True
        else:
            apply_method(model, method, settings, recipe.skip, recipe.only, stats=stats)
        stale = stale or method in RESHAPING
        if progress:
            tqdm.write(f"  {method} ({getattr(settings, 'algo', '')}): {time.perf_counter() - start:.2f} s")
    return model


def apply_block_by_block(model: ConformerCTC, method: str, settings, skip, stats: CalibrationStats) -> None:
    """One calibrated method, block after block, each block's statistics taken on the outputs of the blocks
    before it as compressed; layers outside the blocks (the stem) first, with ``stats``."""
    names = [n for n, _ in target_layers(model, skip)]
    outside = tuple(n for n in names if not n.startswith("blocks."))
    if outside:
        apply_method(model, method, settings, skip, outside, stats=stats)
    inputs = block_inputs(model, stats.calibration)
    for b, block in enumerate(model.blocks):
        prefix = f"blocks.{b}."
        if any(n.startswith(prefix) for n in names):
            runs = [(lambda x=x, m=m: block(x, m)) for x, m in inputs]
            layers = [(prefix + n, m) for n, m in calibrated_layers(block)]
            seen = CalibrationStats(accumulate(block, layers, runs), stats.calibration, 0.0)
            apply_method(model, method, settings, skip, (prefix + "*",), stats=seen)
        with torch.no_grad():
            inputs = [(block(x, m), m) for x, m in inputs]


def finetune(model: ConformerCTC, tokenizer, train_utts, dev_utts, *, steps: int | None = None,
             minutes: float | None = None, lr: float = 1e-4, batch_seconds: float = 90.0, device: str = "auto",
             freeze_layers: int = 0, progress: bool = True, teacher: nn.Module | None = None, distill: bool = False,
             ctc_weight: float | None = None, temperature: float = 1.0, on_step=None,
             precision: str = "fp32", dropout: float | None = None, augment: bool | None = None,
             hidden_weight: float = 0.0) -> dict:
    """Recovery fine-tuning through the one training loop of asr_core. Constraints (masks, codebooks,
    straight-through quantizers) are parametrizations, so every step honours them. ``freeze_layers``: keep the stem
    and the first K blocks fixed and dropout-free, as the model was trained (a frozen pretrained encoder never saw
    dropout; training it here wrecks its features).

    ``distill=True``: learn the posteriors of ``teacher``, the uncompressed model the compressed one was made from
    (the caller passes it; it is frozen while the loop runs, then given back on the CPU, trainable as it was).
    The loss is then KL at ``temperature`` alone, so transcripts are optional (audio from ``read_audio_files``);
    ``ctc_weight`` > 0 adds CTC on the transcripts, which every utterance then needs. Without ``distill`` the
    loss is CTC alone, as before (``teacher`` is not used). ``hidden_weight`` > 0 (distillation only) adds layer
    matching: every block's output against the teacher's (:func:`asr_core.training.hidden_distill_loss`).

    ``dropout``: the student's dropout while it trains (the model keeps its own afterwards). Default: 0 when
    distilling, since the student is to learn the teacher's dropout-free function (with the model's 0.1 a
    distilled structured model got worse: docs/RESULTS.md, "Distillation recovery"); the model's own for CTC.

    ``augment``: the training recipe's speed perturbation and SpecAugment (both models see the same augmented
    features). Default: off when distilling, on for CTC. On masked features a pruned student and its teacher
    disagree far more (KL about 0.35 against 0.05 on the audio as it is), and matching the teacher there made the
    student worse on clean speech; without augmentation distillation recovers (docs/RESULTS.md).
    """
    from asr_core.training import TrainConfig, train

    weights = _loss_weights(train_utts, teacher, distill, ctc_weight)
    if hidden_weight and not distill:
        raise SettingsError("hidden_weight (layer matching) applies to distillation only")
    if dropout is None:
        dropout = 0.0 if distill else None
    if augment is None:
        augment = not distill
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise SettingsError(f"dropout must be in [0, 1), got {dropout}")
    cfg = TrainConfig(lr=lr, warmup_steps=min(50, max(1, (steps or 100) // 10)), max_steps=steps,
                      max_minutes=minutes, batch_seconds=batch_seconds, eval_every=10 ** 9, dev_limit=None,
                      device=device, final_lr_ratio=0.1, precision=precision, freeze_layers=freeze_layers,
                      distill_temperature=temperature, distill_hidden_weight=hidden_weight, spec_augment=augment,
                      speed_factors=TrainConfig.speed_factors if augment else (1.0,), **weights)
    with _dropout_set(model, dropout):
        summary = train(model, tokenizer, train_utts, dev_utts, cfg, out_dir=None, progress=progress,
                        teacher=teacher if distill else None, on_step=on_step)
    model.cpu().eval()
    if distill:
        teacher.cpu()
    summary["augment"] = augment
    summary["hidden_weight"] = hidden_weight
    summary["dropout"] = dropout if dropout is not None else getattr(getattr(model, "cfg", None), "dropout", None)
    return summary


@contextlib.contextmanager
def _dropout_set(model: nn.Module, p: float | None):
    """Inside the block every dropout of ``model`` (``nn.Dropout`` modules and the attention's own ``dropout``
    rate) is ``p`` (None: left as it is); the model's own rates come back after it, also on an error."""
    saved = []
    for module in model.modules() if p is not None else ():
        if isinstance(module, nn.Dropout):
            saved.append((module, "p", module.p))
        elif _is_rate(getattr(module, "dropout", None)):  # _SelfAttention: a rate for F.dropout / SDPA
            saved.append((module, "dropout", module.dropout))
    for module, attr, _ in saved:
        setattr(module, attr, p)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _is_rate(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # a config may say 0 for 0.0


def trained_freeze_layers(model_dir: str) -> int:
    """How many blocks (with the stem) the model was trained with fixed (``train`` records it in config.json):
    recovery fine-tuning keeps them fixed too, as training them has always hurt the shipped baseline."""
    from asr_core.checkpoint import read_config
    from asr_core.provenance import training_details

    return int(training_details(read_config(model_dir)).get("freeze_layers", 0))


def _loss_weights(train_utts, teacher: nn.Module | None, distill: bool, ctc_weight: float | None) -> dict:
    """TrainConfig's ctc_weight and distill_weight for :func:`finetune`; refuses CTC on data without transcripts."""
    if ctc_weight is not None and not distill:
        raise SettingsError("ctc_weight applies to distillation only (without it the loss is CTC alone)")
    if distill and teacher is None:
        raise SettingsError("distillation needs a teacher: the uncompressed model")
    weights = {"ctc_weight": (ctc_weight or 0.0) if distill else 1.0, "distill_weight": 1.0 if distill else 0.0}
    untranscribed = sum(1 for u in train_utts if not u.text.strip())
    if weights["ctc_weight"] > 0 and untranscribed:
        raise SettingsError(f"{untranscribed} of {len(train_utts)} training utterances have no transcript, so "
                            "the data has no transcripts for CTC; use distillation from the uncompressed model "
                            "(with ctc_weight 0)")
    return weights


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
    runtime = decode_model(compressed.cfg, tensors, manifest)  # the stored bytes themselves: no second encoding
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
            w1 = _dense(runtime.get_submodule(name))
            n = w0.numel() + (before.bias.numel() if before.bias is not None else 0)
            # A conv kernel may come back flattened; a layer structured pruning shrank has no comparable error.
            rel_error = (float((w1.reshape(w0.shape) - w0).norm() / w0.norm().clamp_min(1e-12))
                         if w1.numel() == w0.numel() else float("nan"))
            row.update(params=n, bytes_before=4 * n, bytes_after=stored, rel_error=rel_error)
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
