"""Would per-row activation scales on only some of the int8 export's layer inputs keep per-row's WER at
per-tensor's speed? (Per-row on every input: +0.2% WER, 0.38-0.40x of torch FP32's latency; per-tensor: 0.35x,
+2.6%; greedy on the 457, AMD EPYC.)

    edge-asr export --model ART_INT8 --out PT --activations per-tensor
    python experiments/int8_mixed_rows.py PT OUT_PREFIX
    edge-asr evaluate --model OUT_PREFIX_KIND --data dev100.jsonl --decoding greedy --threads 2

Writes one folder per kind of quantized input -- ``qkv`` (the attention's layer-normed input, shared by q, k
and v), ``attn_out`` (the heads, concatenated), ``ffn_up`` (the feed-forward's layer-normed input), ``ffn_down``
(after the GELU) -- each with per-row scales on that kind only (``compression.export.per_row_activations`` on a
subset), per-tensor elsewhere.
"""
import os
import shutil
import sys

import onnx

from compression.export import per_row_activations


def kinds(graph) -> dict[str, str]:
    """DynamicQuantizeLinear input -> its kind, from its name and how many int8 products read it."""
    readers: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "MatMulInteger":
            readers[node.input[0]] = readers.get(node.input[0], 0) + 1
    out = {}
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        a = node.input[0]
        n = readers.get(node.output[0], 0)
        out[a] = ("qkv" if n == 3 else "ffn_up") if a.startswith("layer_norm") else \
            "ffn_down" if a.startswith("gelu") else "attn_out"
    return out


def per_row_on(proto, selected: set) -> int:
    """per_row_activations on the DynamicQuantizeLinear nodes whose input is in ``selected`` only."""
    hidden = [n for n in proto.graph.node if n.op_type == "DynamicQuantizeLinear" and n.input[0] not in selected]
    for n in hidden:  # out of per_row_activations' sight, then back
        n.op_type = "KeepPerTensor"
    count = per_row_activations(proto)
    for n in proto.graph.node:  # the graph's nodes are copies now: rename them, not the list above
        if n.op_type == "KeepPerTensor":
            n.op_type = "DynamicQuantizeLinear"
    return count


def main() -> None:
    source, prefix = sys.argv[1], sys.argv[2]
    base = onnx.load(os.path.join(source, "model.onnx"))
    by_kind = kinds(base.graph)
    for kind in sorted(set(by_kind.values())):
        proto = onnx.ModelProto()
        proto.CopyFrom(base)
        n = per_row_on(proto, {a for a, k in by_kind.items() if k == kind})
        out = f"{prefix}_{kind}"
        shutil.copytree(source, out, dirs_exist_ok=True)
        onnx.save(proto, os.path.join(out, "model.onnx"))
        print(f"{out}: per-row on {n} inputs ({kind})")


if __name__ == "__main__":
    main()
