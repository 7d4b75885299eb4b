"""What a compression method did to a model: the numbers behind the class view's pictures.

Pure functions over (the baseline model, a compressed runtime model, its artifact folder, optionally a clip's
log-mel features). Every result is plain JSON-able numbers (lists, floats, strings);
:mod:`compression.inspect_figures` draws them with plotly, and the studio and ``edge-asr inspect`` both call
:func:`inspect_variant`, so the page and the command line show the same numbers from one computation.

- per compressed layer (:func:`layer_table`): encoding, sparsity (from the stored mask), stored bits per
  original weight, rank kept, relative weight error, and the relative *output* error of the layer on the clip
  (each layer fed the baseline's own input to it, so the number is that layer's damage alone);
- for a chosen layer: a weight histogram before and after with the grid drawn on it (:func:`histogram`), the
  singular-value spectrum with the kept rank (:func:`spectrum`), and what is stored for it with the
  arithmetic of its bytes (:func:`layer_storage`);
- the row's size on disk, part by part, adding up to the folder's bytes (:func:`size_breakdown`);
- the clip frame by frame (:func:`frames`): both models' CTC posteriors and where their argmax differs;
- a two-or-three-sentence explanation of every step of the recipe with its formula (:func:`explain`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asr_core.checkpoint import MANIFEST, folder_bytes, read_weights
from asr_core.decoding import GreedyDecoder
from asr_core.errors import CheckpointError, SettingsError

from .artifact import read_manifest, stored_codebook, stored_mask
from .compress import _dense
from .methods import DEFAULT_SKIP, NAIVE, REFIT_STEPS, target_layers
from .packing import packed_nbytes, unpack_mask

DEFAULT_CLIP = Path(__file__).resolve().parents[1] / "assets" / "clips" / "1272-135031-0000.opus"  # 10.9 s
MAX_SECONDS = 30.0  # the model hears at most 30 s at once (Whisper's positions): longer clips are cut for the views
HIST_BINS = 121
# a layer fed a different width than the baseline's (structured pruning) is compared where widths meet again:
# the FFN or attention module that holds it
PARENT_KINDS = ("ffn1", "ffn2", "attn")
ENCODING_WORDS = {"sparse": "fp16 values (a 1-bit mask beside them where pruned)", "fp16": "fp16, unchanged"}


# ----------------------------------------------------------------------------------------------- the layers
def artifact_parts(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, packed tensors) of an artifact folder, as stored."""
    if not os.path.exists(os.path.join(folder, MANIFEST)):
        raise CheckpointError(f"{folder} is not a compressed artifact (no {MANIFEST}); give a folder written by "
                              "`edge-asr compress`")
    return read_manifest(folder), read_weights(folder)


def source_model(folder: str) -> str | None:
    """The model folder an artifact was made from, when its manifest names one that still exists."""
    source = read_manifest(folder).get("source_model")
    return source if source and os.path.isdir(source) else None


def check_pair(base: nn.Module, model: nn.Module) -> None:
    """Refuse a baseline the variant cannot have been made from (another model's widths or depth)."""
    a, b = base.cfg, model.cfg
    if (a.d_model, a.n_layers, a.vocab_size) != (b.d_model, b.n_layers, b.vocab_size):
        raise SettingsError(f"the artifact (d_model {b.d_model}, {b.n_layers} blocks) was not made from this base "
                            f"model (d_model {a.d_model}, {a.n_layers} blocks); give the model it was compressed "
                            "from", setting="base")


def _skip(manifest: dict) -> tuple[str, ...]:
    return tuple(manifest.get("recipe", {}).get("skip") or DEFAULT_SKIP)


def _packed(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of layer ``name`` keyed by what follows ``name.`` (weight.codes, bias, down.weight...)."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stored_mask(packed: dict[str, torch.Tensor], entry: dict) -> torch.Tensor:
    """A layer's stored 1-bit mask (``weight.mask``), Huffman-decoded if it was coded (the codes are left alone)."""
    return stored_mask({"mask": packed["weight.mask"]}, entry)


def _mask_kept(packed: dict[str, torch.Tensor], entry: dict | None) -> int | None:
    """Weights the stored 1-bit mask keeps (None: no mask, all kept)."""
    if "weight.mask" not in packed or entry is None:
        return None
    return int(unpack_mask(_stored_mask(packed, entry), (math.prod(entry["shape"]),)).sum())


def _flat(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().reshape(weight.shape[0], -1)


def layer_table(base: nn.Module, model: nn.Module, manifest: dict, tensors: dict[str, torch.Tensor]) -> list[dict]:
    """One row per layer the recipe could compress (the baseline's target layers, in module order)."""
    rows = []
    modules = dict(model.named_modules())
    for name, before in target_layers(base, _skip(manifest)):
        after = modules.get(name)
        if after is None:
            continue
        entry, rank = manifest.get("layers", {}).get(name), manifest.get("lowrank", {}).get(name)
        packed = _packed(tensors, name)
        w0, w1 = _flat(before.weight), _flat(_dense(after))
        weight_bytes = sum(_nbytes(v) for k, v in packed.items() if not k.endswith("bias"))
        kept = _mask_kept(packed, entry)
        if rank is not None:
            encoding = f"low rank r={rank}"
        elif entry is not None:
            encoding = entry["encoding"] + ("+int8 kernels" if entry["int8_runtime"] and entry["encoding"] != "int8"
                                            else "")
        else:
            encoding = "fp16" if w1.shape == w0.shape else "fp16, narrower (structured)"
        rows.append({
            "layer": name, "encoding": encoding, "shape_before": list(w0.shape), "shape_after": list(w1.shape),
            "params_before": w0.numel(), "stored_bytes": sum(_nbytes(v) for v in packed.values()),
            "bits_per_weight": 8 * weight_bytes / w0.numel(),
            "sparsity": 0.0 if kept is None else 1 - kept / math.prod(entry["shape"]),
            "kept_share": w1.numel() / w0.numel(), "rank": rank, "full_rank": min(w0.shape),
            "weight_error": float((w1 - w0).norm() / w0.norm().clamp_min(1e-12)) if w1.shape == w0.shape else None,
            "output_error": None})
    return rows


def layer_names(rows: list[dict]) -> list[str]:
    """The layers a chooser lists: those the recipe changed (all of them when it changed none by name)."""
    changed = [r["layer"] for r in rows if r["encoding"] != "fp16"]
    return changed or [r["layer"] for r in rows]


# ----------------------------------------------------------------------------------------------- one clip
@dataclass
class Capture:
    """What the baseline did on one clip: log-probs (T', V) and, per captured module, its call and output."""

    log_probs: torch.Tensor
    calls: dict[str, tuple[tuple, dict, torch.Tensor]] = field(default_factory=dict)


def clip_features(samples: np.ndarray, model: nn.Module) -> torch.Tensor:
    """16 kHz samples -> log-mel (T, F) of their first :data:`MAX_SECONDS`."""
    from asr_core.features import log_mel

    cfg = model.cfg.features
    return log_mel(samples[: int(MAX_SECONDS * cfg.sample_rate)], cfg)


def compared_module(name: str, before: nn.Module, after: nn.Module) -> str | None:
    """The module whose output is compared for layer ``name``: the layer itself when it takes and gives the
    baseline's widths, else the FFN/attention module around it (structured pruning narrowed it); None when
    there is no such module."""
    if _flat(before.weight).shape == _flat(_dense(after)).shape:
        return name
    parent = name.rpartition(".")[0]
    return parent if parent.rpartition(".")[2] in PARENT_KINDS else None


@torch.inference_mode()
def capture(model: nn.Module, features: torch.Tensor, names: list[str]) -> Capture:
    """Run ``model`` on ``features`` (T, F) once, keeping every named module's inputs and output."""
    calls, hooks = {}, []
    for name in dict.fromkeys(names):
        def hook(module, args, kwargs, output, name=name):
            calls[name] = (args, kwargs, output)
        hooks.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        log_probs, _ = model(features[None], torch.tensor([features.shape[0]]))
    finally:
        for h in hooks:
            h.remove()
    return Capture(log_probs[0], calls)


@torch.inference_mode()
def output_errors(base_capture: Capture, model: nn.Module, compared: dict[str, str | None]) -> dict[str, float]:
    """Layer -> ‖f'(x) − f(x)‖ / ‖f(x)‖: the compressed module run on the baseline's own input to it, so each
    number is that layer's damage alone, not the damage of the layers before it arriving there."""
    errors, done = {}, {}
    for layer, module_name in compared.items():
        if module_name is None:
            continue
        if module_name not in done:
            args, kwargs, y0 = base_capture.calls[module_name]
            y1 = model.get_submodule(module_name)(*args, **kwargs)
            done[module_name] = float((y1.float() - y0.float()).norm() / y0.float().norm().clamp_min(1e-12))
        errors[layer] = done[module_name]
    return errors


def frames(base_log_probs: torch.Tensor, log_probs: torch.Tensor, tokenizer, seconds_per_frame: float) -> dict:
    """Both models' CTC posteriors (T', V) frame by frame, their argmax characters and where they differ."""
    pb, pv = base_log_probs.float().exp(), log_probs.float().exp()
    n = min(pb.shape[0], pv.shape[0])
    ab, av = pb[:n].argmax(-1), pv[:n].argmax(-1)
    differ = (ab != av).nonzero().flatten().tolist()
    greedy = GreedyDecoder(tokenizer)
    labels = ["∅" if i == tokenizer.blank_id else ("␣" if t == " " else t) for i, t in enumerate(tokenizer.tokens)]
    return {"seconds_per_frame": seconds_per_frame, "tokens": labels, "frames": n,
            "baseline": {"argmax": ab.tolist(), "posteriors": pb[:n].round(decimals=3).tolist(),
                         "text": greedy(base_log_probs)},
            "variant": {"argmax": av.tolist(), "posteriors": pv[:n].round(decimals=3).tolist(),
                        "text": greedy(log_probs)},
            "differ": differ, "agreement": 1 - len(differ) / max(1, n)}


# ----------------------------------------------------------------------------------------------- one layer
def grid_levels(entry: dict | None, packed: dict[str, torch.Tensor]) -> tuple[list[float], str]:
    """The values a layer's weights may take, to draw on its histogram, and what they are."""
    encoding = (entry or {}).get("encoding")
    if encoding == "kmeans":
        codebook = stored_codebook({k[len("weight."):]: v for k, v in packed.items() if k.startswith("weight.")},
                                   entry)
        if codebook.dim() == 2:  # one codebook per row: draw the row whose range is the median one
            spread = codebook[:, -1] - codebook[:, 0]
            row = int(spread.argsort()[len(spread) // 2])
            return codebook[row].tolist(), (f"the {entry['clusters']} k-means centroids of row {row} (each of the "
                                            f"{codebook.shape[0]} rows has its own)")
        return codebook.tolist(), f"the {entry['clusters']} k-means centroids"
    if encoding in ("int4", "ternary"):
        scale = float(packed["weight.scales"].float().median())
        if encoding == "int4":
            return [k * scale for k in range(-8, 8)], (f"the int4 grid k·S, k = −8…7, of the median group "
                                                       f"(S = {scale:.3g}; each group of {entry['group']} weights "
                                                       "has its own S)")
        return [-scale, 0.0, scale], f"the ternary levels −α, 0, +α of the median α ({scale:.3g})"
    if encoding == "int8":
        return [], "int8: 255 levels per row (S = max|w| / 127), too close together to draw"
    return [], ""


def histogram(before: torch.Tensor, after: torch.Tensor, entry: dict | None, packed: dict[str, torch.Tensor],
              bins: int = HIST_BINS) -> dict:
    """Counts of the weights before (baseline) and after (as decoded from the artifact) on shared bins, the
    levels the stored codes allow, and, when a mask is stored, the magnitude threshold τ that would prune this
    layer's share of weights (and how many of the pruned weights lie below it: all, for magnitude pruning)."""
    b, a = before.detach().float().reshape(-1), after.detach().float().reshape(-1)
    limit = float(max(b.abs().max(), a.abs().max(), 1e-12))
    edges = np.linspace(-limit, limit, bins + 1)
    levels, levels_note = grid_levels(entry, packed)
    out = {"edges": edges.tolist(), "before": np.histogram(b.numpy(), edges)[0].tolist(),
           "after": np.histogram(a.numpy(), edges)[0].tolist(), "levels": levels, "levels_note": levels_note,
           "threshold": None, "pruned": 0, "pruned_below_threshold": None}
    if "weight.mask" in packed and before.numel() == math.prod(entry["shape"]):
        keep = unpack_mask(_stored_mask(packed, entry), (b.numel(),))
        pruned = int((~keep).sum())
        if pruned:
            tau = float(b.abs().kthvalue(pruned).values)
            out.update(threshold=tau, pruned=pruned,
                       pruned_below_threshold=float((b.abs()[~keep] <= tau).float().mean()))
    return out


def spectrum(before: torch.Tensor, rank: int | None) -> dict:
    """Singular values of the baseline weight (out, in) and the share of Σσ² the kept rank holds."""
    sigma = torch.linalg.svdvals(_flat(before))
    energy = torch.cumsum(sigma ** 2, 0) / (sigma ** 2).sum().clamp_min(1e-30)
    out_f, in_f = _flat(before).shape
    return {"sigma": sigma.tolist(), "energy": energy.tolist(), "rank": rank, "full_rank": sigma.numel(),
            "energy_kept": float(energy[rank - 1]) if rank else 1.0, "params_before": out_f * in_f,
            "params_after": rank * (out_f + in_f) if rank else out_f * in_f,
            "break_even_rank": out_f * in_f // (out_f + in_f)}


def _formula(field_name: str, t: torch.Tensor, entry: dict | None, kept: int) -> str:
    """How many bytes a stored tensor takes, as arithmetic a reader can redo."""
    nbytes = _nbytes(t)
    if entry is not None and field_name == "weight.mask":
        n = math.prod(entry["shape"])
        if "mask" in entry.get("huffman", ()):
            plain = packed_nbytes(n, 1)
            return (f"{n:,} weights × 1 bit ÷ 8 = {plain:,} B, Huffman-coded (lossless) to {nbytes:,} B "
                    f"({nbytes / plain:.0%})")
        return f"{n:,} weights × 1 bit ÷ 8 = {nbytes:,} B"
    if entry is not None and field_name in ("weight.codes", "weight.indices"):
        bits = entry["bits"]
        extra = f" (⌈log₂ {entry['clusters']}⌉ = {bits})" if field_name == "weight.indices" else ""
        packed = packed_nbytes(kept, bits)
        if field_name[len("weight."):] in entry.get("huffman", ()):
            return (f"{kept:,} kept weights × {bits} bits{extra} ÷ 8 = {packed:,} B, Huffman-coded (lossless) to "
                    f"{nbytes:,} B ({nbytes / packed:.0%})")
        return f"{kept:,} kept weights × {bits} bits{extra} ÷ 8 = {nbytes:,} B"
    if field_name == "weight.codebook":
        if t.dim() == 2:
            width = "1 B (a code on the row's 256-level grid)" if t.dtype == torch.uint8 else "2 B (fp16)"
            return f"{t.shape[0]:,} rows × {t.shape[1]} centroids × {width} = {nbytes:,} B"
        return f"{t.numel()} centroids × 4 B (fp32) = {nbytes:,} B"
    if field_name == "weight.codebook_grid":
        return f"{t.shape[0]:,} rows × (low, high) × 2 B (fp16) = {nbytes:,} B"
    if field_name == "weight.scales":
        return f"{' × '.join(map(str, t.shape))} scales × 2 B (fp16) = {nbytes:,} B"
    if field_name == "weight.values":
        return f"{kept:,} kept weights × 2 B (fp16) = {nbytes:,} B"
    shape = f"{' × '.join(map(str, t.shape))} = " if t.dim() > 1 else ""
    return f"{shape}{t.numel():,} × {t.element_size()} B ({str(t.dtype)[6:]}) = {nbytes:,} B"


def layer_storage(name: str, manifest: dict, packed: dict[str, torch.Tensor], row: dict) -> dict:
    """Every tensor stored for one layer with the arithmetic of its bytes, and the layer's bits per weight."""
    items = []
    for key, t in sorted(packed.items()):
        sub = key.split(".")[0] if key.split(".")[0] in ("down", "up") else ""
        entry = manifest.get("layers", {}).get(f"{name}.{sub}" if sub else name)
        field_name = key[len(sub) + 1:] if sub else key
        sub_packed = {k[len(sub) + 1:]: v for k, v in packed.items() if k.startswith(sub + ".")} if sub else packed
        kept = _mask_kept(sub_packed, entry)
        kept = kept if kept is not None else (math.prod(entry["shape"]) if entry else t.numel())
        items.append({"tensor": key, "shape": list(t.shape), "dtype": str(t.dtype)[6:], "bytes": _nbytes(t),
                      "formula": _formula(field_name, t, entry, kept)})
    out_f, in_f = row["shape_before"]
    lowrank = None
    if row["rank"]:
        r = row["rank"]
        lowrank = {"m": out_f, "n": in_f, "r": r, "params_before": out_f * in_f, "params_after": r * (out_f + in_f)}
    return {"layer": name, "tensors": items, "total_bytes": sum(i["bytes"] for i in items),
            "params": row["params_before"], "bits_per_weight": row["bits_per_weight"],
            "fp32_bytes": 4 * row["params_before"], "lowrank": lowrank}


def size_breakdown(folder: str, tensors: dict[str, torch.Tensor], rows: list[dict]) -> dict:
    """The folder's bytes part by part: each kind of compressed layer, the tensors kept in fp16, the
    safetensors header and the JSON files. The parts add up to the bytes on disk (the page's Size MB)."""
    from asr_core.checkpoint import WEIGHTS

    kind = {r["layer"]: "low rank" if r["rank"] else r["encoding"] for r in rows}
    parts: dict[str, dict] = {}
    for key, t in tensors.items():
        pieces = key.split(".")
        layer = next((".".join(pieces[:i]) for i in range(len(pieces) - 1, 0, -1) if ".".join(pieces[:i]) in kind),
                     None)
        label = f"layers stored as {ENCODING_WORDS.get(kind[layer], kind[layer])}" if layer else \
            "everything else, fp16 (norms, biases, depthwise convolutions, skipped layers such as the CTC head)"
        part = parts.setdefault(label, {"part": label, "bytes": 0, "tensors": 0, "layers": set()})
        part["bytes"] += _nbytes(t)
        part["tensors"] += 1
        if layer:
            part["layers"].add(layer)
    rows_out = [{**p, "layers": len(p["layers"])} for p in parts.values()]
    weights_file = os.path.getsize(os.path.join(folder, WEIGHTS))
    rows_out.append({"part": "safetensors header (tensor names, shapes, offsets)", "tensors": 0, "layers": 0,
                     "bytes": weights_file - sum(_nbytes(t) for t in tensors.values())})
    for entry in sorted(os.listdir(folder)):
        if entry != WEIGHTS and os.path.isfile(os.path.join(folder, entry)):
            rows_out.append({"part": entry, "bytes": os.path.getsize(os.path.join(folder, entry)), "tensors": 0,
                             "layers": 0})
    return {"parts": rows_out, "total_bytes": folder_bytes(folder)}


# ----------------------------------------------------------------------------------------------- everything
def clip_modules(base: nn.Module) -> list[str]:
    """What :func:`capture` keeps so that any variant can be compared on the clip: every layer a recipe may
    compress and the FFN/attention modules around them."""
    names = [n for n, _ in target_layers(base, ())]
    return names + sorted({n.rpartition(".")[0] for n in names if n.rpartition(".")[0].rpartition(".")[2]
                           in PARENT_KINDS})


def seconds_per_frame(model: nn.Module) -> float:
    cfg = model.cfg
    return cfg.features.hop_length * cfg.subsampling_factor / cfg.features.sample_rate


def inspect_variant(base: nn.Module, model: nn.Module, folder: str, tokenizer, features: torch.Tensor | None = None,
                    layer: str | None = None, base_capture: Capture | None = None) -> dict:
    """Every number the class view shows for one variant: ``model`` is the runtime model of the artifact
    ``folder``, made from ``base``. ``features`` (T, F): a clip for the output errors and the frame view
    (``base_capture``: the baseline's :func:`capture` of it, when already made). ``layer``: the layer the
    histogram, spectrum and storage describe (default: the most damaged on the clip, else the first changed)."""
    check_pair(base, model)
    manifest, tensors = artifact_parts(folder)
    rows = layer_table(base, model, manifest, tensors)
    names = layer_names(rows)
    clip = None
    if features is not None:
        modules = dict(model.named_modules())
        compared = {r["layer"]: compared_module(r["layer"], base.get_submodule(r["layer"]), modules[r["layer"]])
                    for r in rows}
        base_capture = base_capture or capture(base, features, [m for m in compared.values() if m])
        errors = output_errors(base_capture, model, compared)
        for r in rows:
            r["output_error"] = errors.get(r["layer"])
        with torch.inference_mode():
            log_probs, _ = model(features[None], torch.tensor([features.shape[0]]))
        clip = frames(base_capture.log_probs, log_probs[0], tokenizer, seconds_per_frame(base))
    if layer is None:
        damaged = [r for r in rows if r["layer"] in names and r["output_error"] is not None]
        layer = max(damaged, key=lambda r: r["output_error"])["layer"] if damaged else names[0]
    if layer not in names:
        raise SettingsError(f"no compressed layer {layer!r} in this variant; its layers: {', '.join(names)}",
                            setting="layer")
    row = next(r for r in rows if r["layer"] == layer)
    packed = _packed(tensors, layer)
    entry = manifest.get("layers", {}).get(layer)
    before, after = _flat(base.get_submodule(layer).weight), _flat(_dense(model.get_submodule(layer)))
    has_svd = any(s.get("method") == "svd" for s in manifest.get("recipe", {}).get("steps", []))
    return {"recipe": manifest.get("recipe", {}), "layers": rows, "layer_names": names, "layer": layer,
            "histogram": histogram(before, after, entry, packed),
            "spectrum": spectrum(before, row["rank"]) if has_svd else None,
            "storage": layer_storage(layer, manifest, packed, row), "size": size_breakdown(folder, tensors, rows),
            "frames": clip}



# ----------------------------------------------------------------------------------------------- the words
# Per method: what it does (two or three sentences), its formula (KaTeX between $$), what its knob changes.
# Our quantizers are symmetric: the zero point Z of the general w_q = round(w/S) + Z is 0, so zero stays zero.
METHODS = {
    "int8": ("INT8 weights", "Every output channel (row) $i$ of a weight matrix gets one scale $S_i$, and each weight "
             "is stored as an 8-bit integer code. At run time the layer runs on int8 kernels: its input is rounded "
             "to 8 bits on the fly too (dynamic quantization).",
             r"w_q = \mathrm{round}(w / S_i), \quad S_i = \max_j |W_{ij}| \,/\, 127, \quad \hat w = S_i\, w_q",
             "no knob: 8 bits per weight and one fp16 scale per row."),
    "int4": ("INT4 weights, in groups", "Each row is cut into groups of $g$ consecutive weights; each group gets "
             "its own scale $S$ and every weight becomes a 4-bit code in $[-8, 7]$, two per byte. Smaller groups "
             "follow the weights more closely but store more scales.",
             r"w_q = \mathrm{clamp}\big(\mathrm{round}(w/S),\,-8,\,7\big), \quad S = \max_{\text{group}} |W| \,/\, 7,"
             r" \quad \hat w = S\, w_q",
             "the group size $g$: weights sharing one fp16 scale, so $4 + 16/g$ bits per weight."),
    "ternary": ("Ternary weights", "Each weight becomes $-\\alpha$, $0$ or $+\\alpha$: a 2-bit code, with one "
                "$\\alpha$ per row (or per group). Weights below the threshold $\\Delta$ become zero (TWN).",
                r"\hat w = \alpha\, \mathrm{sign}(w)\, [\,|w| > \Delta\,], \quad \Delta = 0.7\, \overline{|W|}, \quad "
                r"\alpha = \overline{|w|}_{\,|w| > \Delta}",
                "no knob: 2 bits per weight and one fp16 $\\alpha$ per row."),
    "prune": ("Unstructured pruning", "A share $s$ of the weights is set to exactly zero and a 1-bit mask records "
              "which survived; the kept weights are stored at 16 bits (or by the step after it). The zeros save "
              "bytes on disk, but a CPU's dense kernels still multiply them, so latency does not drop.",
              r"M_{ij} = [\,|W_{ij}| \ge \tau\,], \qquad \hat W = M \odot W",
              "the sparsity $s$. Weights are bell-shaped around zero: the smallest 30% carry little of a layer's "
              "output, but each further step cuts into the bulk (watch $\\tau$ move out on the histogram), so the "
              "damage grows faster than $s$: 50% hurts much more than 30%."),
    "structured": ("Structured pruning", "Whole FFN hidden units and attention heads are removed from every "
                   "block, so each matrix becomes a smaller dense matrix: no mask, and the model really runs "
                   "faster.", r"d_{ff} \to \lceil d_{ff}(1-f) \rceil, \qquad 2\, d\, d_{ff} \to 2\, d\, "
                   r"\lceil d_{ff}(1-f) \rceil \text{ parameters per FFN}",
                   "the fraction $f$ of FFN units and of heads removed in every block."),
    "svd": ("Low rank (SVD)", "Each weight matrix is replaced by two thin ones holding its top $r$ singular "
            "directions. It pays only when $r$ is below $mn/(m+n)$; layers where it would not are kept whole.",
            r"W \approx U_r \Sigma_r V_r^\top = (U_r \Sigma_r^{1/2})(\Sigma_r^{1/2} V_r^\top), \qquad "
            r"m\cdot n \to r\,(m + n) \text{ parameters}",
            "the energy $E$ kept: the smallest $r$ with $\\sum_{i \\le r} \\sigma_i^2 \\ge E \\sum_i \\sigma_i^2$."),
    "kmeans": ("K-means weight sharing", "All weights of a layer share a codebook of $K$ values (the centroids "
               "k-means finds); each weight stores only the index of its centroid, $\\lceil \\log_2 K \\rceil$ "
               "bits (Deep Compression, Han et al. 2016).",
               r"\min_{c_1 \dots c_K} \sum_{ij} \min_k \,(W_{ij} - c_k)^2, \qquad \hat W_{ij} = c_{k(ij)}",
               "the number of clusters $K$: $\\lceil \\log_2 K \\rceil$ bits per weight plus $K$ fp32 centroids per "
               "layer (calibrated: $K$ centroids per output row, each row its own codebook, stored as 8-bit codes on "
               "the row's own grid; `centroid_bits=16`: fp16). The index stream is then Huffman-coded, losslessly."),
}
ALGORITHMS = {
    "gptq": "**GPTQ** (Frantar et al. 2022) rounds one input column at a time and pushes each column's rounding "
            "error onto the columns not yet rounded, through the inverse Hessian $H = E[xx^\\top]$ of the layer's "
            "calibration inputs: it minimises the layer's output error $\\lVert (W - \\hat W) X \\rVert^2$, not "
            "the weight error. Scales are first searched over clipping ranges.",
    "rtn": "**Round to nearest** (data-free): every weight rounds on its own to the nearest level.",
    "sparsegpt": "**SparseGPT** (Frantar & Alistarh 2023) chooses the mask block by block by the saliency "
                 "$w_{ij}^2 / [H^{-1}]_{jj}^2$, one threshold over all rows of each block of 128 inputs (so a row "
                 "that matters keeps more; `select=row`: the same share in every row), and updates the weights it "
                 "keeps to make up for each one removed, so the output on calibration audio changes least; then "
                 f"{REFIT_STEPS} conjugate-gradient steps move the kept weights towards the least-squares solution "
                 "for that mask (`refit=`). It keeps some small weights and prunes some large ones: the "
                 "histogram's threshold is not a hard edge.",
    "wanda": "**Wanda** prunes by $|W_{ij}| \\cdot \\lVert X_j \\rVert_2$ in each row: a small weight on a loud "
             f"input matters more than its size says. No weight update (`refit={REFIT_STEPS}` adds the least-squares "
             "one).",
    "magnitude": "**Magnitude** (data-free): one threshold $\\tau$ on $|W|$ over all layers.",
    "reconstruct": "**FLAP + refit**: a unit's importance is its input's variance on calibration audio times the "
                   "squared norm of the weights it feeds; the lowest go, and the layer after them is refitted by "
                   "least squares on what is kept (with the removed units' mean folded into the bias).",
    "norm": "**Weight norms** (data-free): a unit's importance is the norm of its input row times the norm of "
            "its output column.",
    "activation": "**SVD-LLM**: the SVD is taken of $W S$, with $S$ the Cholesky factor of the input covariance, "
                  "so the kept directions carry the most *output* variance on real audio; the rank is the one "
                  "the weight's own spectrum gives at the energy knob, so both algorithms store the same bytes.",
    "weight": "**Plain SVD** (data-free) of the weight alone.",
    "weighted": "**Weighted k-means** (SqueezeLLM): each output row gets its own $K$ centroids, fitted with "
                "each weight counting by its input's energy $H_{jj}$; then GPTQ's sweep rounds each column to the "
                "nearest centroid of its row with error feedback (`codebook=layer`: one codebook for the layer).",
    "lloyd": "**Lloyd's k-means** (data-free) on the weights alone, from a linear initialisation.",
}
CALIBRATED_NOTE = ("Every calibrated algorithm then corrects the bias for the shift of the output mean: "
                   "$b \\leftarrow b - (\\hat W - W)\\,E[x]$.")


def _step_text(step: dict) -> str:
    method = step["method"]
    title, what, formula, knob = METHODS[method]
    settings = ", ".join(f"{k}={v}" for k, v in step.items() if k not in ("method", "algo") and v is not None)
    algo = step.get("algo")
    lines = [f"#### {title} — `{method}{':' + settings if settings else ''}`", what, f"$${formula}$$",
             f"**The knob:** {knob}"]
    if algo in ALGORITHMS:
        lines.append(ALGORITHMS[algo])
    return "\n\n".join(lines)


def explain_storage(report: dict) -> str:
    """Markdown: every tensor stored for the chosen layer with the arithmetic of its bytes, then the row's bytes
    on disk part by part up to the folder's total."""
    storage, layer = report["storage"], report["layer"]
    lines = [f"#### What is stored for `{layer}`", "| tensor | shape | bytes |", "|---|---|---|"]
    lines += [f"| `{t['tensor']}` | {' × '.join(map(str, t['shape']))} | {t['formula']} |" for t in storage["tensors"]]
    lines.append(f"\n{storage['params']:,} weights in {storage['total_bytes']:,} B: "
                 f"**{storage['bits_per_weight']:.2f} bits per weight** (fp32: 32, {storage['fp32_bytes']:,} B).")
    if storage["lowrank"]:
        lr = storage["lowrank"]
        lines.append(f"Low rank: $m \\cdot n = {lr['m']} \\cdot {lr['n']} = {lr['params_before']:,}$ parameters "
                     f"$\\to r\\,(m+n) = {lr['r']} \\cdot {lr['m'] + lr['n']} = {lr['params_after']:,}$.")
    size = report["size"]
    lines += ["", "#### This row's size on disk", "| part | layers | bytes |", "|---|---:|---:|"]
    lines += [f"| {p['part']} | {p['layers'] or ''} | {p['bytes']:,} |" for p in size["parts"]]
    lines.append(f"| **total** (the Size MB column) | | **{size['total_bytes']:,}** |")
    return "\n".join(lines)


def explain(report: dict, storage: bool = True) -> str:
    """Markdown (LaTeX between $ and $$) for one :func:`inspect_variant` report: each step of the recipe with
    its formula and algorithm, where the damage is, then (``storage``) what is stored for the chosen layer and
    how the row's bytes add up (:func:`explain_storage`; the page shows it below the pictures)."""
    steps = report["recipe"].get("steps", [])
    parts = [_step_text(s) for s in steps]
    if any(s.get("algo") in ALGORITHMS and s.get("algo") not in NAIVE.values() for s in steps):
        parts.append(CALIBRATED_NOTE)
    damaged = sorted((r for r in report["layers"] if r["output_error"] is not None),
                     key=lambda r: -r["output_error"])[:3]
    if damaged:
        parts.append("**Most damaged layers on the clip** (each fed the baseline's own input): " + ", ".join(
            f"`{r['layer']}` {100 * r['output_error']:.1f}%" for r in damaged) + ".")
    if report["frames"]:
        f = report["frames"]
        parts.append(f"**Frame by frame:** the two models' best character agrees on {100 * f['agreement']:.1f}% of "
                     f"{f['frames']} frames ({1000 * f['seconds_per_frame']:.0f} ms each).")
    if storage:
        parts.append(explain_storage(report))
    return "\n\n".join(parts)
