"""Compressed model <-> artifact folder of packed bytes, and the runtime model both give.

Folder: ``config.json`` (the model config, possibly shrunk), ``vocab.json``, ``compression.json`` (recipe and
per-layer encodings) and ``model.safetensors`` with packed tensors:

============  ===============================================================================
encoding      stored per layer (``mask``: 1 bit per weight, only when pruned; codes of kept weights only)
============  ===============================================================================
int8          ``codes`` int8, ``scales`` fp16 per output channel
int4          ``codes`` 4-bit packed (2 per byte), ``scales`` fp16 per group
ternary       ``codes`` 2-bit packed (4 per byte), ``scales`` (alpha) fp16 per output channel (or group)
kmeans        ``indices`` ceil(log2 K)-bit packed, ``codebook`` fp32 (K values), or (out, K) with
              ``"codebook": "row"``: one per output row, fp16, or uint8 codes with ``"centroids": "uint8"``
              and ``codebook_grid`` fp16 (out, 2): each row's grid ends, low and high
sparse        ``values`` fp16 of the kept weights
============  ===============================================================================

A layer's integer code stream (``codes``, ``indices``) and its ``mask`` are stored Huffman-coded when that makes
them smaller (the entry lists which under ``"huffman"``; :func:`compression.packing.huffman_encode`); scales and
codebooks are not (they do not compress). Everything else (biases, norms, depthwise and front-end convolutions, the CTC
head) is stored in fp16.
``int8_runtime`` layers run on torch's int8 kernels after loading; the other encodings are decoded to float
weights on load. :func:`to_runtime` goes through the same encode/decode functions as save/load, so the
in-memory compressed model and the loaded artifact compute the same numbers.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from asr_core.checkpoint import MANIFEST, model_config, read_config, read_weights, write_model_files
from asr_core.errors import CheckpointError
from asr_core.model import ConformerCTC
from asr_core.provenance import Provenance
from asr_core.text import CharTokenizer

from .methods import Clustered, LowRankLinear, Mask, _set_child, centroid_grid, constraints, grid_codes, grid_values
from .packing import (bits_for, huffman_decode, huffman_encode, pack_bits, pack_mask, packed_nbytes, unpack_bits,
                      unpack_mask)
from .quantize import (FakeQuant, int4_dequantize, int8_dequantize, int8_quantize, quantized_int8_linear,
                       ternary_dequantize)

FORMAT = "edge-asr-artifact"
# 2: code streams and masks may be Huffman-coded, row codebooks uint8 grids; a reader of version 1 would take
# those bytes for plain packing and build wrong weights without an error, so versions above this are refused
MANIFEST_VERSION = 2


def _chain_value(linear: nn.Module, upto: int | None = None) -> torch.Tensor:
    """The weight after the first ``upto`` parametrizations (all when None), as (out, in x kernel)."""
    value = linear.parametrizations.weight.original.detach().float()
    for p in constraints(linear)[:upto]:
        value = p(value).detach()
    return value.reshape(value.shape[0], -1)


def encode_linear(linear: nn.Linear) -> tuple[dict[str, torch.Tensor], dict]:
    """A parametrized Linear -> (packed tensors, manifest entry)."""
    chain = constraints(linear)
    kinds = [p.kind if isinstance(p, FakeQuant) else type(p).__name__ for p in chain]
    int8_runtime = bool(kinds) and kinds[-1] == "int8" and isinstance(linear, nn.Linear)
    activations = chain[-1].activations if int8_runtime else "reduced"
    shape = list(linear.parametrizations.weight.original.shape)
    mask = next((p.mask for p in chain if isinstance(p, (Mask, Clustered))), None)
    if mask is not None:
        mask = None if bool(mask.all()) else mask.reshape(shape[0], -1)  # nothing pruned: no mask to store
    select = (lambda t: t[mask]) if mask is not None else (lambda t: t.reshape(-1))
    tensors: dict[str, torch.Tensor] = {}
    entry: dict = {"shape": shape, "int8_runtime": int8_runtime,
                   **({"int8_activations": activations} if activations != "reduced" else {})}
    if mask is not None:
        tensors["mask"] = pack_mask(mask)
    grid = next((i for i, k in enumerate(kinds) if k in ("Clustered", "int4", "ternary")), None)
    if grid is not None and kinds[grid] == "Clustered":
        clustered = chain[grid]
        k = clustered.codebook.shape[-1]
        entry.update(encoding="kmeans", clusters=k, bits=bits_for(k))
        tensors["indices"] = pack_bits(select(clustered.indices.reshape(shape[0], -1)), bits_for(k))
        if clustered.codebook.dim() == 2:  # one per row, stored as the centroids were rounded when chosen
            entry["codebook"] = "row"
            codebook = clustered.codebook.detach().float()
            if clustered.row_centroids == "uint8":
                entry["centroids"] = "uint8"
                low, high = centroid_grid(codebook)
                tensors["codebook"] = grid_codes(codebook, low, high).to(torch.uint8)
                tensors["codebook_grid"] = torch.stack([low, high], 1).half()
            else:
                tensors["codebook"] = codebook.half()
        else:
            tensors["codebook"] = clustered.codebook.detach().float().clone()
    elif grid is not None:
        codes, scales = chain[grid].encode(_chain_value(linear, grid))
        if kinds[grid] == "int4":
            entry.update(encoding="int4", bits=4, group=chain[grid].group)
            tensors["codes"] = pack_bits(select(codes.long() + 8), 4)
        else:
            entry.update(encoding="ternary", bits=2, **({"group": chain[grid].group} if chain[grid].group else {}))
            tensors["codes"] = pack_bits(select(codes.long() + 1), 2)
        tensors["scales"] = scales.half()
    elif "int8" in kinds:
        codes, scales = chain[kinds.index("int8")].encode(_chain_value(linear, kinds.index("int8")))
        entry.update(encoding="int8", bits=8)
        tensors["codes"] = select(codes).clone()
        tensors["scales"] = scales.half()
    else:
        entry.update(encoding="sparse", bits=16)
        tensors["values"] = select(_chain_value(linear)).half()
    return tensors, entry


# the fields Huffman coding may shrink: a layer's integer code stream, and its mask (an N:M mask holds 2.6 bits of
# choices in each group of 4 bits; an unstructured one at 50% next to nothing, so it is kept only if it shrinks)
CODE_FIELDS = ("codes", "indices", "mask")


def huffman_code(tensors: dict[str, torch.Tensor], entry: dict) -> None:
    """Replace a layer's code streams by their Huffman coding where it is smaller; the entry lists which."""
    coded = []
    for field in CODE_FIELDS:
        smaller = huffman_encode(tensors[field]) if field in tensors else None
        if smaller is not None:
            tensors[field] = smaller
            coded.append(field)
    if coded:
        entry["huffman"] = coded


def plain_fields(tensors: dict[str, torch.Tensor], entry: dict) -> dict[str, torch.Tensor]:
    """A layer's stored tensors with its Huffman-coded fields decoded (int8 codes back to int8), each checked
    against the length the entry implies: the mask first, since the codes hold only its kept weights."""
    coded = entry.get("huffman", ())
    if not coded:
        return tensors
    plain, weights = dict(tensors), math.prod(entry["shape"])
    try:
        if "mask" in coded:
            plain["mask"] = stored_mask(tensors, entry)
        kept = int(unpack_mask(plain["mask"], (weights,)).sum()) if "mask" in plain else weights
        for field in set(coded) - {"mask"}:
            if entry["encoding"] == "int8":  # one signed byte a kept weight
                plain[field] = huffman_decode(tensors[field], kept, torch.int8)
            else:
                plain[field] = huffman_decode(tensors[field], packed_nbytes(kept, entry["bits"]))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"artifact layer of shape {entry.get('shape')}: {err}") from None
    return plain


def stored_mask(tensors: dict[str, torch.Tensor], entry: dict) -> torch.Tensor:
    """A layer's 1-bit mask as packed bytes (``unpack_mask`` reads them), Huffman-decoded if it was stored coded.
    Raises CheckpointError (corrupt stream) or KeyError (no mask)."""
    if "mask" not in entry.get("huffman", ()):
        return tensors["mask"]
    try:
        return huffman_decode(tensors["mask"], packed_nbytes(math.prod(entry["shape"]), 1))
    except ValueError as err:
        raise CheckpointError(f"artifact layer of shape {entry.get('shape')}: {err}") from None


def stored_codebook(tensors: dict[str, torch.Tensor], entry: dict) -> torch.Tensor:
    """A k-means layer's float codebook: (k,) for the layer, or (out, k) one per row (fp16, or uint8 codes on each
    row's grid ``codebook_grid`` (out, 2): its low and high end)."""
    if entry.get("centroids") == "uint8":
        grid = tensors["codebook_grid"].float()
        return grid_values(tensors["codebook"], grid[:, 0], grid[:, 1])
    return tensors["codebook"].float()


def _placer(tensors: dict[str, torch.Tensor], entry: dict):
    """(place, n): ``place(values)`` puts a layer's n stored values at their places in (out, in x kernel),
    ``fill`` where the stored mask prunes (all places without a mask)."""
    full_shape = tuple(entry["shape"])
    shape = (full_shape[0], math.prod(full_shape[1:]))
    mask = unpack_mask(tensors["mask"], shape) if "mask" in tensors else None
    n = int(mask.sum()) if mask is not None else shape[0] * shape[1]

    def place(values: torch.Tensor, fill=0) -> torch.Tensor:
        if mask is None:
            return values.reshape(shape)
        full = torch.full(shape, fill, dtype=values.dtype)
        full[mask] = values
        return full
    return place, n


# bits of each grid encoding and the offset that makes its stored codes unsigned
_GRID_CODES = {"int4": (4, 8), "ternary": (2, 1)}


def integer_codes(tensors: dict[str, torch.Tensor], entry: dict) -> torch.Tensor:
    """The signed codes (out, in x kernel) of an int4, ternary or int8 layer, 0 where pruned (``tensors`` as
    stored)."""
    return _integer_codes(plain_fields(tensors, entry), entry)


def _integer_codes(tensors: dict[str, torch.Tensor], entry: dict) -> torch.Tensor:
    place, n = _placer(tensors, entry)
    encoding = entry["encoding"]
    if encoding == "int8":
        return place(tensors["codes"]).to(torch.int8)
    bits, offset = _GRID_CODES[encoding]
    return place(unpack_bits(tensors["codes"], bits, n) - offset)


def decode_weight(tensors: dict[str, torch.Tensor], entry: dict) -> tuple[torch.Tensor, tuple | None]:
    """Packed tensors, as stored -> (float weight (out, in x kernel), int8 (codes, scales) when stored as int8 else
    None)."""
    tensors, encoding = plain_fields(tensors, entry), entry["encoding"]
    if encoding == "kmeans":
        place, n = _placer(tensors, entry)
        indices = unpack_bits(tensors["indices"], entry["bits"], n)
        codebook = stored_codebook(tensors, entry)
        if codebook.dim() == 2:  # (out, k): each row indexes its own codebook; pruned places back to 0
            return codebook.gather(1, place(indices)) * place(torch.ones(n)), None
        return place(codebook[indices]), None
    if encoding == "int4":
        return int4_dequantize(_integer_codes(tensors, entry), tensors["scales"].float(), entry["group"]), None
    if encoding == "ternary":
        codes = _integer_codes(tensors, entry)
        return ternary_dequantize(codes, tensors["scales"].float(), entry.get("group")), None
    if encoding == "int8":
        codes, scales = _integer_codes(tensors, entry), tensors["scales"].float()
        return int8_dequantize(codes, scales), (codes, scales)
    if encoding == "sparse":
        place, _ = _placer(tensors, entry)
        return place(tensors["values"].float()), None
    raise CheckpointError(f"unknown layer encoding {encoding!r} in {MANIFEST}")


def int8_codes(tensors: dict[str, torch.Tensor], entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (codes (out, in) int8, scales (out,)) an int8-runtime layer multiplies by: an int8-stored layer's own,
    without making its float weight; any other encoding's decoded weight rounded as :func:`int8_quantize`."""
    if entry["encoding"] != "int8":
        return int8_quantize(decode_weight(tensors, entry)[0].float())
    try:
        return integer_codes(tensors, entry), tensors["scales"].float()
    except KeyError as err:
        raise CheckpointError(f"int8 layer without its {err}") from None


def _is_parametrization(module: nn.Module) -> bool:
    return isinstance(module, (ParametrizationList, Mask, Clustered, FakeQuant))


def encode_model(model: ConformerCTC, entropy_coding: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Compressed (parametrized) model -> (all tensors to store, manifest with per-layer entries).
    ``entropy_coding``: Huffman-code the code streams (lossless; off where the bytes are decoded at once)."""
    tensors: dict[str, torch.Tensor] = {}
    layers, lowrank = {}, {}
    for name, module in model.named_modules():
        if _is_parametrization(module) or ".parametrizations" in name:
            continue
        if isinstance(module, LowRankLinear):
            lowrank[name] = module.rank
        if parametrize.is_parametrized(module, "weight"):
            packed, entry = encode_linear(module)
            if entropy_coding:
                huffman_code(packed, entry)
            layers[name] = entry
            tensors.update({f"{name}.weight.{k}": v for k, v in packed.items()})
        for kind in (module._parameters, module._buffers):
            for pname, value in kind.items():
                if value is not None:
                    stored = value.detach().cpu()
                    tensors[f"{name}.{pname}" if name else pname] = stored.half() if stored.is_floating_point() \
                        else stored.clone()
    return tensors, {"layers": layers, "lowrank": lowrank}


def decode_model(cfg, tensors: dict[str, torch.Tensor], manifest: dict) -> ConformerCTC:
    """Build the runtime model: shrunk config, low-rank modules, decoded weights, int8 kernels."""
    with torch.device("meta"):  # every tensor is overwritten below: no random initialisation (0.2 s a model)
        model = ConformerCTC(cfg)
        for name, rank in manifest.get("lowrank", {}).items():
            old = model.get_submodule(name)
            _set_child(model, name, LowRankLinear(old.in_features, rank, old.out_features, bias=old.bias is not None))
    layers = manifest.get("layers", {})
    # Layers that run on int8 kernels never get a float weight in the model: int8-stored ones use their codes,
    # others (a chain's k-means indices) are decoded one layer at a time and rounded. A float weight per layer,
    # freed again once the int8 module replaced it, left the process holding most of the FP32 model's memory.
    direct_int8 = {n for n, e in layers.items() if e.get("int8_runtime")}
    for name in direct_int8 & {n for n, _ in model.named_modules()}:
        model.get_submodule(name).weight = nn.Parameter(torch.empty(0), requires_grad=False)
    model = model.to_empty(device="cpu")
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(f"{n}.weight.") for n in layers)}
    expected = set(model.state_dict()) - {f"{n}.weight" for n in layers}
    if set(rest) != expected:
        missing, extra = sorted(expected - set(rest)), sorted(set(rest) - expected)
        raise CheckpointError(f"artifact tensors do not match its config: missing {missing[:3]}, extra {extra[:3]}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in rest.items()}, strict=False)
    with torch.no_grad():
        for name, entry in layers.items():
            prefix = f"{name}.weight."
            packed = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                if name in direct_int8:
                    weight, int8 = None, int8_codes(packed, entry)
                else:
                    weight, int8 = decode_weight(packed, entry)
            except CheckpointError as err:
                raise CheckpointError(f"layer {name}: {err}") from None
            linear = model.get_submodule(name)
            if weight is not None:
                linear.weight.copy_(weight.reshape(linear.weight.shape))
            if entry.get("int8_runtime"):
                with warnings.catch_warnings():  # torch flags its quantized-tensor constructors as deprecated
                    warnings.simplefilter("ignore")
                    _set_child(model, name, quantized_int8_linear(linear, *(int8 or (None, None)),
                                                                  activations=int8_activations(entry)))
    return model.eval()


def int8_activations(entry: dict) -> str:
    """A manifest entry's int8 activation rounding (ACTIVATIONS); artifacts of format version 1 before per-row
    stored a bool ``int8_full_range`` instead."""
    return entry.get("int8_activations") or ("full" if entry.get("int8_full_range") else "reduced")


def to_runtime(model: ConformerCTC) -> ConformerCTC:
    """The model a device runs, exactly as :func:`load_artifact` will rebuild it."""
    tensors, manifest = encode_model(model, entropy_coding=False)  # lossless: the same numbers, less work
    return decode_model(model.cfg, tensors, manifest)


def save_artifact(model: ConformerCTC, folder: str, tokenizer: CharTokenizer, recipe_json: dict,
                  extra: dict | None = None, provenance: Provenance | None = None) -> dict:
    """Write the artifact folder; returns the manifest. ``provenance`` goes into config.json."""
    os.makedirs(folder, exist_ok=True)
    tensors, manifest = encode_model(model)
    manifest = {"format": FORMAT, "version": MANIFEST_VERSION, "recipe": recipe_json, **manifest, **(extra or {})}
    write_model_files(folder, tensors, {"format": FORMAT, "version": 1, "model": model.cfg.to_dict()}, tokenizer,
                      provenance)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def read_manifest(folder: str) -> dict:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder}/{MANIFEST} is unreadable ({err})") from None
    version = manifest.get("version", 1) if isinstance(manifest, dict) else 1
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise CheckpointError(f"{folder} is an artifact of format version {version}, newer than this edge-asr reads "
                              f"({MANIFEST_VERSION}); upgrade edge-asr to load it")
    return manifest


def load_artifact(folder: str, **_options) -> ConformerCTC:
    """The runtime model of an artifact folder (asr_core's loader calls this through its format registry;
    runtime options such as ``threads`` do not apply to torch modules)."""
    manifest = read_manifest(folder)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{folder}/{MANIFEST} is not an {FORMAT} manifest")
    return decode_model(model_config(read_config(folder)), read_weights(folder), manifest)
