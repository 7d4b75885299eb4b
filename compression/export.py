"""Model folder (trained checkpoint or compressed artifact) -> ONNX model folder for ONNX Runtime.

Output folder: ``model.onnx`` (inputs ``features`` (1, T, n_mels) float32 and ``lengths`` (1,) int64; outputs
``log_probs`` (1, T', V) and ``out_lengths`` (1,) -- ONNX names are single-assignment, so the output lengths
cannot share the input's name; T is dynamic), ``config.json`` (format ``edge-asr-onnx``, the ModelConfig with
its front-end settings, and an ``onnx`` section saying how every weight was stored), ``vocab.json``, and the
word LM (``lm.arpa.gz``, ``decoding.json``) when the source has one.

Weights:

- A trained checkpoint exports in fp32; ``quantize="int8"`` then applies ONNX Runtime's dynamic quantizer
  (8 bits per output channel, int8 or uint8 weights as below, MatMul only) and ``"int4"`` its MatMulNBits
  quantizer (block 64, symmetric).
- A compressed artifact keeps its own codes, never rounded a second time: its ``int8_runtime`` layers become
  DynamicQuantizeLinear + MatMulInteger with the artifact's int8 codes (int8, or uint8 with zero point 128 on
  x86 CPUs without VNNI, whose u8 x s8 kernel saturates: :func:`int8_weight_type`) and fp16 scales (ORT fuses
  that pattern into one int8 kernel, as torch's dynamic int8 Linear; :func:`per_row_activations` optionally
  gives each frame its own activation scale), its int4 layers ``MatMulNBits`` with the artifact's 4-bit codes
  and group scales (fp32 compute, as the torch artifact; groups that MatMulNBits cannot take -- not a power of
  two from 16 -- stay fp32). A chain that ends in int8 after another encoding (``prune+kmeans+int8``) runs on int8
  kernels in torch with the int8 rounding of its decoded weights; the export does the same
  (``int8_requantized`` counts those). Everything else (kmeans, ternary, pruned, low-rank factors without
  int8, int8-encoded convolutions) is exported as the dequantized fp32 weights the torch
  artifact computes with; ``config.json["onnx"]["dequantized"]`` counts those by encoding.

The torch graph is traced from a plain float ConformerCTC holding exactly the artifact's decoded weights; each
quantized MatMul is then found by the bytes of its (transposed) weight initializer, which the exporter names
arbitrarily (``val_123``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from torch import nn

from asr_core.checkpoint import (CONFIG, MANIFEST, VOCAB, is_artifact, load_model, model_config, read_config,
                                 read_tokenizer, read_weights)
from asr_core.errors import CheckpointError, SettingsError

ONNX_FORMAT = "edge-asr-onnx"
MODEL_FILE = "model.onnx"
INPUT_NAMES = ("features", "lengths")
OUTPUT_NAMES = ("log_probs", "out_lengths")
QUANTIZE = ("none", "int8", "int4")
# torch's dynamo exporter starts at 18; at 23 it writes ONNX's Attention op, whose ORT 1.32 CPU kernel refuses
# the (B, 1, 1, T) broadcast key mask ("inconsistent q_sequence_length"), so 22 is the last that runs
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 22, 18
MAX_FRAMES = 3000  # 30 s of 10 ms frames: the longest window asr_core.transcribe feeds the model
ORT_INT4_BLOCK = 64  # block size for ORT's own 4-bit quantizer on an fp32 source (the artifacts' default group)
COPIED = ("lm.arpa.gz", "decoding.json")
INSTALL_HINT = 'pip install -e ".[onnx]"'


ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # the onnx extra: the exporter needs all three


def onnx_missing() -> str | None:
    """Why exporting cannot work here ("needs onnxscript: pip install ..."), found without importing anything;
    None when every package of the extra is installed."""
    import importlib.util

    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(missing)}: {INSTALL_HINT}" if missing else None


def require_onnx():
    """Import onnx, onnxruntime and onnxscript (the exporter needs all three); SettingsError naming the fix."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter builds the graph with it)
    except ImportError as err:
        raise SettingsError(f"ONNX export needs onnx, onnxruntime and onnxscript ({err.name or err} is not "
                            f"installed): {INSTALL_HINT}") from None
    return onnx, onnxruntime


# ------------------------------------------------------------------------------------------ the float model
def float_artifact_model(folder: str) -> tuple[nn.Module, dict[str, tuple[dict, dict]]]:
    """An artifact folder -> (plain float ConformerCTC with its decoded weights, {layer: (entry, packed)}).

    Mirrors :func:`compression.artifact.decode_model` minus the swap to torch's int8 modules, which the ONNX
    exporter cannot trace; those layers hold ``codes * scales``, which is what the int8 kernels multiply by.
    """
    from compression.artifact import FORMAT as ARTIFACT_FORMAT, decode_weight, read_manifest
    from compression.methods import LowRankLinear, _set_child
    from asr_core.model import ConformerCTC

    manifest = read_manifest(folder)
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise CheckpointError(f"{folder}/{MANIFEST} is not an {ARTIFACT_FORMAT} manifest")
    cfg = model_config(read_config(folder))
    tensors = read_weights(folder)
    model = ConformerCTC(cfg)
    for name, rank in manifest.get("lowrank", {}).items():
        old = model.get_submodule(name)
        _set_child(model, name, LowRankLinear(old.in_features, rank, old.out_features, bias=old.bias is not None))
    layers = manifest.get("layers", {})
    packed = {name: {k[len(name) + 8:]: v for k, v in tensors.items() if k.startswith(f"{name}.weight.")}
              for name in layers}
    rest = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()
            if not any(k.startswith(f"{n}.weight.") for n in layers)}
    expected = set(model.state_dict()) - {f"{n}.weight" for n in layers}
    if set(rest) != expected:
        missing, extra = sorted(expected - set(rest)), sorted(set(rest) - expected)
        raise CheckpointError(f"{folder}: artifact tensors do not match its config: missing {missing[:3]}, "
                              f"extra {extra[:3]}")
    model.load_state_dict(rest, strict=False)
    with torch.no_grad():
        for name, entry in layers.items():
            weight, _ = decode_weight(packed[name], entry)
            module = model.get_submodule(name)
            module.weight.copy_(weight.reshape(module.weight.shape))
    return model.eval(), {name: (layers[name], packed[name]) for name in layers}


def load_source(model_dir: str) -> tuple[nn.Module, object, dict | None]:
    """(float torch model, tokenizer, artifact layers or None for a trained checkpoint)."""
    config = read_config(model_dir)  # CheckpointError for a missing folder or config.json
    if config.get("format") == ONNX_FORMAT:
        raise CheckpointError(f"{model_dir} is already an ONNX model folder; export its torch source instead")
    if is_artifact(model_dir):
        model, layers = float_artifact_model(model_dir)
        return model, read_tokenizer(model_dir), layers
    model, tokenizer = load_model(model_dir)
    return model.float().eval(), tokenizer, None


# ------------------------------------------------------------------------------------------------- tracing
def trace_to_onnx(model: nn.Module, path: str, opset: int) -> None:
    """torch.export the model with a dynamic frame axis and write one self-contained ONNX file."""
    n_mels = model.cfg.features.n_mels
    frames = 200  # any length in the dynamic range; the graph has no data-dependent control flow
    example = (torch.zeros(1, frames, n_mels), torch.tensor([frames], dtype=torch.int64))
    dims = ({1: torch.export.Dim("T", min=16, max=MAX_FRAMES)}, None)
    try:
        torch.onnx.export(model, example, path, dynamo=True, external_data=False, opset_version=opset,
                          verbose=False, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_shapes=dims)
    except Exception as err:  # the exporter raises many types; say which model and opset failed
        raise CheckpointError(f"ONNX export at opset {opset} failed: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from err


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def matmul_layers(graph, model: nn.Module, names) -> dict[str, tuple[object, str]]:
    """{layer name: (MatMul node, weight initializer name)} for those ``names`` whose transposed weight
    (in, out) is the B initializer of a MatMul: matched on the exact fp32 bytes."""
    from onnx import numpy_helper

    wanted: dict[str, list[str]] = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            wanted.setdefault(_digest(module.weight.detach().float().T.numpy()), []).append(name)
    inits = {i.name: i for i in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        candidates = wanted.get(_digest(numpy_helper.to_array(inits[node.input[1]])))
        if candidates:
            # layers with identical weights (all-zero ones) are interchangeable; take them in graph order
            found[candidates.pop(0) if len(candidates) > 1 else candidates[0]] = (node, node.input[1])
    return found


# ------------------------------------------------------------------------------------- the artifact's codes
def runs_int8(entry: dict) -> bool:
    """Whether the torch artifact runs this layer on int8 kernels (``int8_runtime``: int8 last in its chain)."""
    return bool(entry.get("int8_runtime"))


def artifact_codes(packed: dict[str, torch.Tensor], entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """A layer -> (signed integer codes (out, in) int8, fp32 scales) as the torch artifact computes with them:

    - int4: its 4-bit codes and (out, groups) scales (:func:`compression.artifact.integer_codes`);
    - int8: its int8 codes and (out,) scales;
    - another encoding followed by int8 (``prune+kmeans+int8``): the int8 rounding of the decoded weights with
      :func:`asr_core.weight_int8.int8_quantize`, exactly what ``quantized_int8_linear`` does on load.
    Pruned weights have code 0."""
    from asr_core.weight_int8 import int8_quantize
    from compression.artifact import decode_weight, integer_codes

    if entry["encoding"] != "int4":
        weight, int8 = decode_weight(packed, entry)
        codes, scales = int8 if int8 is not None else int8_quantize(weight)
        return codes.numpy().astype(np.int8), scales.float().numpy()
    return integer_codes(packed, entry).numpy().astype(np.int8), packed["scales"].float().numpy()


def int4_supported(entry: dict) -> bool:
    """MatMulNBits takes blocks of a power of two from 16 up (MLAS kernels); other groups stay fp32."""
    group = entry.get("group", 0)
    return group >= 16 and group & (group - 1) == 0


def pack_nbits(codes: np.ndarray, group: int) -> np.ndarray:
    """Signed 4-bit codes (N, K) -> MatMulNBits' B: uint8 (N, ceil(K / group), group / 2); per byte the even
    element in the low nibble; values stored as code + 8 (the op's default zero point when none is given).
    K is padded with code 0 (stored 8) to whole blocks, as the artifact's grouping pads with zeros."""
    n, k = codes.shape
    blocks = -(-k // group)
    q = np.full((n, blocks * group), 8, np.uint8)
    q[:, :k] = (codes.astype(np.int16) + 8).astype(np.uint8)
    q = q.reshape(n, blocks, group)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


INT8_WEIGHTS = ("auto", "s8", "u8")


def int8_weight_type(choice: str = "auto") -> str:
    """How int8 weight codes are stored in model.onnx: "s8" (int8, ONNX Runtime's usual u8 x s8 kernel) or "u8"
    (uint8 with zero point 128: u8 x u8, the same integer products). Measured on the shipped int8 artifact
    (scripts/onnx_latency.py, 2 threads): on an AVX-512-VNNI CPU s8 ran at 0.32x of torch FP32's latency and u8 at
    0.72x (no VNNI kernel for u8 x u8); on an AVX2 CPU without VNNI both at about 0.5x, but there the s8 kernel
    sums pairs of products in int16 and saturates (log-probs up to 1.1 off torch's), u8 is exact. "auto": s8
    where this CPU multiplies s8 exactly (:func:`asr_core.onnx_model.has_int8_dot_product`; also when it cannot
    tell), else u8 -- export on the kind of CPU the model will run on, or choose."""
    from asr_core.onnx_model import has_int8_dot_product

    if choice not in INT8_WEIGHTS:
        raise SettingsError(f"int8 weights must be one of {', '.join(INT8_WEIGHTS)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "u8" if has_int8_dot_product() is False else "s8"


def _int8_nodes(helper, numpy_helper, node, w_name: str, codes, scales, quantized_inputs: set,
                weights: str = "s8"):
    """MatMul(A, W) -> DynamicQuantizeLinear(A); MatMulInteger(A_q, W_q, A_zp, W_zp); Cast; Mul(A_s * w_s): the
    pattern ORT's own dynamic quantizer writes, which its optimizer fuses into one int8 kernel. ``weights``: the
    codes as int8 ("s8", zero point 0) or shifted into uint8 ("u8", zero point 128): :func:`int8_weight_type`."""
    a, out = node.input[0], node.output[0]
    nodes = []
    if a not in quantized_inputs:  # q, k and v share one input: quantize it once
        quantized_inputs.add(a)
        nodes.append(helper.make_node("DynamicQuantizeLinear", [a], [f"{a}_q", f"{a}_scale", f"{a}_zp"],
                                      name=f"{a}_DynamicQuantizeLinear"))
    if weights == "u8":
        stored, zero = (codes.astype(np.int16) + 128).astype(np.uint8), np.full(codes.shape[0], 128, np.uint8)
    else:
        stored, zero = codes.astype(np.int8), np.zeros(codes.shape[0], np.int8)
    inits = [numpy_helper.from_array(np.ascontiguousarray(stored.T), f"{w_name}_int8"),
             numpy_helper.from_array(zero, f"{w_name}_int8_zp"),
             numpy_helper.from_array(scales.astype(np.float32), f"{w_name}_int8_scale")]
    nodes += [
        helper.make_node("MatMulInteger", [f"{a}_q", inits[0].name, f"{a}_zp", inits[1].name], [f"{out}_int32"],
                         name=f"{node.name}_MatMulInteger"),
        helper.make_node("Mul", [f"{a}_scale", inits[2].name], [f"{out}_scales"], name=f"{node.name}_scales"),
        helper.make_node("Cast", [f"{out}_int32"], [f"{out}_float"], to=1, name=f"{node.name}_cast"),
        helper.make_node("Mul", [f"{out}_float", f"{out}_scales"], [out], name=f"{node.name}_rescale"),
    ]
    return nodes, inits


def _int4_nodes(helper, numpy_helper, node, w_name: str, codes, scales, group: int, accuracy_level: int):
    """MatMul(A, W) -> MatMulNBits(A, packed codes, group scales): the artifact's 4-bit grid as it is."""
    n, k = codes.shape
    inits = [numpy_helper.from_array(pack_nbits(codes, group), f"{w_name}_q4"),
             numpy_helper.from_array(np.ascontiguousarray(scales, dtype=np.float32), f"{w_name}_q4_scales")]
    extra = {"accuracy_level": accuracy_level} if accuracy_level else {}
    nbits = helper.make_node("MatMulNBits", [node.input[0], inits[0].name, inits[1].name], [node.output[0]],
                             name=f"{node.name}_Q4", domain="com.microsoft", K=k, N=n, bits=4, block_size=group,
                             **extra)
    return [nbits], inits


def apply_artifact_codes(proto, model: nn.Module, layers: dict, accuracy_level: int = 0,
                         int8_weights: str = "s8") -> dict:
    """Rewrite, in place, the MatMuls of the artifact's int8-runtime and int4 layers with its own codes;
    returns {"int8": n, "int4": n, "dequantized": {encoding: n}} (layers left as fp32 weights)."""
    from onnx import helper, numpy_helper

    targets = [name for name, (entry, _) in layers.items()
               if runs_int8(entry) or (entry["encoding"] == "int4" and int4_supported(entry))]
    found = matmul_layers(proto.graph, model, targets)
    by_node = {id(node): (name, w) for name, (node, w) in found.items()}
    counts = {"int8": 0, "int4": 0, "int8_requantized": {}}
    quantized_inputs, new_nodes, new_inits = set(), [], []
    for node in proto.graph.node:
        if id(node) not in by_node:
            new_nodes.append(node)
            continue
        name, w_name = by_node[id(node)]
        entry, packed = layers[name]
        codes, scales = artifact_codes(packed, entry)
        if runs_int8(entry):
            nodes, inits = _int8_nodes(helper, numpy_helper, node, w_name, codes, scales, quantized_inputs,
                                       int8_weights)
        else:
            nodes, inits = _int4_nodes(helper, numpy_helper, node, w_name, codes, scales, entry["group"],
                                       accuracy_level)
        kind = "int8" if runs_int8(entry) else "int4"
        counts[kind] += 1
        if kind == "int8" and entry["encoding"] != "int8":  # e.g. kmeans values, int8-rounded as torch does
            again = counts["int8_requantized"]
            again[entry["encoding"]] = again.get(entry["encoding"], 0) + 1
        new_nodes += nodes
        new_inits += inits
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    _drop_unused_initializers(proto.graph)
    proto.graph.initializer.extend(new_inits)
    if counts["int4"] and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    dequantized: dict[str, int] = {}
    for name, (entry, _) in layers.items():
        if name not in found:
            key = entry["encoding"] if entry["encoding"] not in ("int8", "int4") else f"{entry['encoding']}-as-fp32"
            dequantized[key] = dequantized.get(key, 0) + 1
    return {**counts, "dequantized": dequantized}


def _drop_unused_initializers(graph) -> None:
    used = {i for node in graph.node for i in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def weight_bytes(proto) -> dict[str, int]:
    """Bytes of the graph's initializers by element type ({"float32": n, "uint8": n, ...}): what ONNX Runtime
    holds of the weights, counted exactly from each one's type and shape (a resident-memory reading of the load
    alone moved by 10-25 MB between equal runs with the allocator's reuse of freed pages; prepacked copies are
    not counted here)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    totals: dict[str, int] = {}
    for init in proto.graph.initializer:
        dtype = tensor_dtype_to_np_dtype(init.data_type)
        totals[str(dtype)] = totals.get(str(dtype), 0) + int(np.prod(init.dims, dtype=np.int64)) * dtype.itemsize
    return dict(sorted(totals.items()))


def count_matmul_weights(proto) -> dict:
    """{"int8": MatMulInteger/DynamicQuantizeMatMul ops, "int4": MatMulNBits ops, "fp32": MatMuls with a weight}."""
    inits = {i.name for i in proto.graph.initializer}
    counts = {"int8": 0, "int4": 0, "fp32": 0}
    for node in proto.graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            counts["int8"] += 1
        elif node.op_type == "MatMulNBits":
            counts["int4"] += 1
        elif node.op_type == "MatMul" and node.input[1] in inits:
            counts["fp32"] += 1
    return counts


# ------------------------------------------------------------------------------------ per-row activations
ACTIVATIONS = ("auto", "per-tensor", "per-row")


def resolve_activations(choice: str, layers: dict | None) -> str:
    """"auto": per-row where the artifact's own int8 layers round per row (so the ONNX model computes what the
    torch artifact does), else per-tensor (ORT's dynamic quantizer: fastest)."""
    if choice != "auto":
        return choice
    from compression.artifact import int8_activations

    entries = (entry for entry, _ in (layers or {}).values())  # {layer: (manifest entry, packed tensors)}
    rows = any(e.get("int8_runtime") and int8_activations(e) == "per-row" for e in entries)
    return "per-row" if rows else "per-tensor"


_ROW_CONSTS = {"axes": np.array([-1], np.int64), "flat": np.array([-1], np.int64),
               "eps": np.array(1e-8, np.float32), "1/127": np.array(1 / 127, np.float32),
               "0": np.array(0, np.float32), "1": np.array(1, np.float32), "128": np.array(128, np.float32),
               "128u8": np.array(128, np.uint8)}


def _per_row_quantizer(helper, node, const) -> list:
    """The nodes replacing DynamicQuantizeLinear(A) -> (A_q, A_scale, A_zp) with a symmetric quantizer per row
    of A (1, T, K) or (T, K) (the export's batch of one): scale_t = max|A_t| / 127 (``{A}_rows``, (1, T, 1)),
    one zero point 128 for all rows (MatMulInteger takes a single zero point for A). A_scale becomes 1 and the
    rows are scaled after each product (:func:`per_row_activations`): ORT fuses MatMulInteger + Cast + Mul
    into MatMulIntegerToFloat, which takes A's scale as a scalar, and a (1, T, 1) one there gave log-probs 12
    off. The 1 is computed from the input (a constant would be folded into the weight scales first, and ORT
    would then not fuse at all: slower)."""
    from onnx import TensorProto

    a, (q, scale, _) = node.input[0], node.output
    p = f"{a}_row"
    make = helper.make_node
    return [
        make("ReduceMax", [a, const["axes"]], [f"{p}_max"], keepdims=1),  # max |A_t| as max(max, -min):
        make("ReduceMin", [a, const["axes"]], [f"{p}_min"], keepdims=1),  # two reads, no |A| written
        make("Neg", [f"{p}_min"], [f"{p}_negmin"]),
        make("Max", [f"{p}_max", f"{p}_negmin", const["eps"]], [f"{p}_absmax"]),
        make("Mul", [f"{p}_absmax", const["1/127"]], [f"{a}_rows"]),
        make("Reshape", [f"{a}_rows", const["flat"]], [f"{p}_scale_t"]),  # (T,): QuantizeLinear's axis -2
        make("Mul", [f"{p}_scale_t", const["0"]], [f"{p}_zeros"]),
        make("Add", [f"{p}_zeros", const["128"]], [f"{p}_zp_f"]),
        make("Cast", [f"{p}_zp_f"], [f"{p}_zp_t"], to=TensorProto.UINT8),
        make("QuantizeLinear", [a, f"{p}_scale_t", f"{p}_zp_t"], [q], axis=-2),  # round half even, saturate
        make("ReduceMax", [f"{p}_scale_t"], [f"{p}_top"], keepdims=0),
        make("Mul", [f"{p}_top", const["0"]], [f"{p}_nil"]),
        make("Add", [f"{p}_nil", const["1"]], [scale]),
    ]


def per_row_activations(proto) -> int:
    """Rewrite, in place, every DynamicQuantizeLinear of the graph (per-tensor activation scales: one loud frame
    coarsens every frame's grid) into :func:`_per_row_quantizer`, and multiply each of its products by the rows'
    scales after the rescaling Mul; returns how many were rewritten. On the shipped int8 artifact, greedy on the
    457 held-out utterances: per-tensor +2.3% relative to FP32, per-row -0.1%; latency 0.31-0.35x -> 0.37-0.39x
    of torch FP32's (docs/RESULTS.md)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    const = {k: f"row_const_{k}" for k in _ROW_CONSTS}
    quantized = {n.output[0]: n for n in graph.node if n.op_type == "DynamicQuantizeLinear"}  # A_q -> its node
    if not quantized:
        return 0
    graph.initializer.extend(numpy_helper.from_array(v, const[k]) for k, v in _ROW_CONSTS.items())
    rows_of = {n.output[0]: f"{quantized[n.input[0]].input[0]}_rows" for n in graph.node
               if n.op_type == "MatMulInteger" and n.input[0] in quantized}  # int32 product -> A's row scales
    cast_of = {n.output[0]: rows_of[n.input[0]] for n in graph.node if n.op_type == "Cast" and n.input[0] in rows_of}
    zero_points = {n.output[2] for n in quantized.values()}
    nodes = []
    for node in graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            nodes += _per_row_quantizer(helper, node, const)
            continue
        for i, name in enumerate(node.input):
            if name in zero_points:  # A's zero point is the constant 128 now
                node.input[i] = const["128u8"]
        nodes.append(node)
        product = next((x for x in node.input if x in cast_of), None) if node.op_type == "Mul" else None
        if product is not None:  # the product's rescaling: then by the rows' scales
            out = node.output[0]
            node.output[0] = f"{out}_per_tensor"
            nodes.append(helper.make_node("Mul", [f"{out}_per_tensor", cast_of[product]], [out]))
    del graph.node[:]
    graph.node.extend(nodes)
    return len(quantized)


# ------------------------------------------------------------------------------------ ORT's own quantizers
def ort_quantize(path: str, kind: str, accuracy_level: int = 0, int8_weights: str = "s8") -> None:
    """Quantize an fp32 ``model.onnx`` in place with ONNX Runtime's quantizers (weights with a constant B only;
    int8 weights as ``int8_weights``: :func:`int8_weight_type`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path + ".q.tmp"
    if kind == "int8":
        weight_type = QuantType.QUInt8 if int8_weights == "u8" else QuantType.QInt8
        quantize_dynamic(path, tmp, weight_type=weight_type, per_channel=True, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True})
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(path), block_size=ORT_INT4_BLOCK, is_symmetric=True,
                                         accuracy_level=accuracy_level or None)
        quantizer.process()
        onnx.save(quantizer.model.model, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- the folder
def check_against_torch(model: nn.Module, path: str, frames: int = 300) -> float:
    """Max |log-prob difference| between the exported graph (ORT, 1 thread) and the float torch model on one
    fixed random input of ``frames`` frames. Near 1e-5 for fp32; quantized graphs differ by their rounding."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, frames, model.cfg.features.n_mels, generator=gen)
    lengths = torch.tensor([frames])
    with torch.inference_mode():
        expected = model(feats, lengths)[0].numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT_NAMES[0]], {INPUT_NAMES[0]: feats.numpy(), INPUT_NAMES[1]: lengths.numpy()})[0]
    except Exception as err:  # ORT's pybind error types; the folder is written but unusable: say so
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"the exported {path} does not run in ONNX Runtime: {first[:300]}") from None
    return float(np.abs(got - expected).max())


def _check_arguments(quantize: str, opset: int | None, artifact: bool, model_dir: str,
                     activations: str = "auto") -> int:
    if quantize not in QUANTIZE:
        raise SettingsError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if activations not in ACTIVATIONS:
        raise SettingsError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise SettingsError(f"ONNX opset {opset!r} is not supported: use {MIN_OPSET} to {MAX_OPSET} "
                            f"(torch's exporter starts at {MIN_OPSET})")
    if artifact and quantize != "none":
        raise SettingsError(f"{model_dir} is a compressed artifact: its int8/int4 layers are exported with its own "
                            "codes; leave quantize at 'none' (quantize= is for trained fp32 checkpoints)")
    return opset


def write_folder(out_dir: str, model: nn.Module, tokenizer, model_dir: str, onnx_section: dict) -> None:
    """config.json (with an "export" provenance record tied to model.onnx), vocab.json and the source's LM files
    beside model.onnx."""
    from asr_core.provenance import Provenance, current_command, file_sha256, parent

    record = Provenance("export", current_command(), [parent(model_dir, read_config(model_dir))], {},
                        {"onnx": onnx_section, "file": MODEL_FILE},
                        weights_sha256=file_sha256(os.path.join(out_dir, MODEL_FILE)))
    config = {"format": ONNX_FORMAT, "version": 1, "model": model.cfg.to_dict(), "onnx": onnx_section,
              "provenance": record.to_dict()}
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, VOCAB), "w") as f:
        f.write(tokenizer.to_json())
    for name in COPIED:
        if os.path.exists(os.path.join(model_dir, name)):
            shutil.copy2(os.path.join(model_dir, name), os.path.join(out_dir, name))


def _write_graph(onnx, model: nn.Module, layers: dict | None, tmp: str, model_dir: str, quantize: str,
                 opset: int, accuracy_level: int, int8_weights: str, activations: str) -> dict:
    """Trace to ``tmp``, then put in the artifact's codes or apply ORT's quantizer; returns the "onnx" section."""
    from compression.artifact import read_manifest

    trace_to_onnx(model, tmp, opset)
    section = {"opset": opset, "quantize": quantize, "source": os.path.abspath(model_dir),
               "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES),
               "parameters": sum(p.numel() for p in model.parameters())}  # of the float model: weights, not bytes
    if layers is not None:
        proto = onnx.load(tmp)
        rewritten = apply_artifact_codes(proto, model, layers, accuracy_level, int8_weights)
        onnx.save(proto, tmp)
        section.update(quantize="artifact", dequantized=rewritten["dequantized"],
                       int8_requantized=rewritten["int8_requantized"],
                       lowrank=len(read_manifest(model_dir).get("lowrank", {})))
    elif quantize != "none":
        ort_quantize(tmp, quantize, accuracy_level, int8_weights)
    if accuracy_level:
        section["accuracy_level"] = accuracy_level
    if activations == "per-row":
        proto = onnx.load(tmp)
        if per_row_activations(proto):
            onnx.save(proto, tmp)
            section["activations"] = "per-row"
    proto = onnx.load(tmp, load_external_data=False)
    section["weights"], section["weight_bytes"] = count_matmul_weights(proto), weight_bytes(proto)
    if section["weights"].get("int8"):
        section["int8_weights"] = int8_weights
    return section


def export_onnx(model_dir: str, out_dir: str, *, quantize: str = "none", opset: int | None = None,
                accuracy_level: int = 0, check: bool = True, int8_weights: str = "auto",
                activations: str = "auto") -> dict:
    """Export any model folder to an ONNX model folder (see the module docstring); returns its "onnx" section
    plus ``seconds`` (export time), ``bytes`` (model.onnx size) and ``max_abs_diff`` (vs the float torch model
    on one random input, when ``check``). ``accuracy_level``: MatMulNBits' compute type (0: fp32, as the torch
    artifact computes; 4: int8 activations, faster and less exact). ``int8_weights``: "auto", "s8" or "u8"
    (:func:`int8_weight_type`; recorded in the section when the graph has int8 weights). ``activations``:
    how int8 layers round their inputs at run time, "per-tensor" (ORT's dynamic quantizer: fastest),
    "per-row" (:func:`per_row_activations`: closer to FP32, slower; recorded when applied) or "auto"
    (:func:`resolve_activations`: as the artifact's own int8 layers)."""
    start = time.perf_counter()
    onnx, _ = require_onnx()
    int8_weights = int8_weight_type(int8_weights)
    opset = _check_arguments(quantize, opset, is_artifact(model_dir), model_dir, activations)
    model, tokenizer, layers = load_source(model_dir)
    activations = resolve_activations(activations, layers)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    tmp = path + ".tmp"
    try:
        section = _write_graph(onnx, model, layers, tmp, model_dir, quantize, opset, accuracy_level, int8_weights,
                               activations)
        os.replace(tmp, path)  # never leave a half-written model.onnx behind
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_folder(out_dir, model, tokenizer, model_dir, section)
    result = {**section, "seconds": round(time.perf_counter() - start, 2), "bytes": os.path.getsize(path)}
    if check:
        result["max_abs_diff"] = check_against_torch(model, path)
    return result


def main(argv=None) -> int:
    """``python -m compression.export MODEL_DIR OUT_DIR [--quantize none|int8|int4] [--opset N]``: prints JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m compression.export", description=main.__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE)
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--accuracy-level", type=int, default=0, choices=(0, 1, 2, 3, 4))
    parser.add_argument("--int8-weights", default="auto", choices=INT8_WEIGHTS)
    parser.add_argument("--activations", default="auto", choices=ACTIVATIONS)
    args = parser.parse_args(argv)
    from asr_core.errors import EdgeASRError

    try:
        result = export_onnx(args.model_dir, args.out_dir, quantize=args.quantize, opset=args.opset,
                             accuracy_level=args.accuracy_level, int8_weights=args.int8_weights,
                             activations=args.activations)
    except EdgeASRError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
