"""Does folding each Linear's bias Add into a Gemm (on a 2-D view of the activations) speed up the exported
FP32 model in ONNX Runtime? (Its own MatMul+Add fusion takes 2-D inputs only, and ours are (B, T, D).)

    edge-asr export --out /tmp/fp32 && cp -r /tmp/fp32 /tmp/fp32_gemm
    python experiments/ort_gemm_bias.py /tmp/fp32/model.onnx /tmp/fp32_gemm/model.onnx
    python scripts/onnx_latency.py /tmp/fp32 /tmp/fp32_gemm /tmp/fp32 /tmp/fp32_gemm --runs 15

Rewrites MatMul(X, W) + Add(b) into Reshape(X, [-1, K]) -> Gemm(·, W, b) -> Reshape back to X's leading axes
+ [N] (57 of the shipped model's Linears; outputs within 1.4e-5). Answer: **no**, slower (RESULTS.md, "ONNX
Runtime": 0.69x / 0.69x of torch FP32 against 0.66x / 0.63x for the plain export, alternated).
"""
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def fold_bias_into_gemm(model: onnx.ModelProto) -> int:
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in g.output}
    added = [numpy_helper.from_array(np.array([0], np.int64), "gemm_zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "gemm_minus_one")]
    names = {a.name for a in added}

    def constant(name, values):
        if name not in names:
            names.add(name)
            added.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    nodes, folded, reshaped = [], set(), set()
    for node in g.node:
        if id(node) in folded:
            continue
        nxt = consumers.get(node.output[0], []) if node.op_type == "MatMul" else []
        is_bias_add = len(nxt) == 1 and nxt[0].op_type == "Add"
        bias = [i for i in nxt[0].input if i != node.output[0]][0] if is_bias_add else None
        if (bias in inits and len(inits[bias].dims) == 1 and node.input[1] in inits
                and len(inits[node.input[1]].dims) == 2 and node.output[0] not in outputs):
            x, (k, n) = node.input[0], inits[node.input[1]].dims
            if x not in reshaped:  # q, k and v share one input: view it once
                reshaped.add(x)
                nodes += [helper.make_node("Shape", [x], [x + "_shape"]),
                          helper.make_node("Slice", [x + "_shape", "gemm_zero", "gemm_minus_one"], [x + "_lead"]),
                          helper.make_node("Reshape", [x, constant(f"gemm_k{k}", [-1, k])], [x + "_2d"])]
            out = nxt[0].output[0]
            nodes += [helper.make_node("Gemm", [x + "_2d", node.input[1], bias], [out + "_2d"]),
                      helper.make_node("Concat", [x + "_lead", constant(f"gemm_n{n}", [n])], [out + "_shape"], axis=0),
                      helper.make_node("Reshape", [out + "_2d", out + "_shape"], [out])]
            folded.add(id(nxt[0]))
            continue
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(added)
    return len(folded)


if __name__ == "__main__":
    proto = onnx.load(sys.argv[1])
    print("folded", fold_bias_into_gemm(proto), "bias Adds")
    onnx.save(proto, sys.argv[2])
