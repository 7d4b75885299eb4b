"""Is the exported attention faster as one ONNX Runtime ``com.microsoft.MultiHeadAttention`` node per block?

    python experiments/ort_attention_fusion.py ONNX_DIR OUT_DIR [nobias]
    python scripts/onnx_latency.py ONNX_DIR OUT_DIR

Replaces each scaled-dot-product-attention subgraph of an exported folder (heads Reshape/Transpose, the two
scale Muls, the mask Add, Softmax, the two MatMuls) by one node taking the (B, T, D) projections, their biases
(folded unless ``nobias``) and the frames' validity mask as int32; drops what nothing reads any more. Answer:
docs/RESULTS.md, "int8 again on this host" -- no clear gain, so the exporter does not do it.
"""
import json
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.export import _drop_unused_initializers

HEAD_OPS = {"Mul", "Transpose", "Reshape"}  # between a (B, T, D) projection and the score / value products


class Graph:
    """Producer and consumer lookups over a graph, and its constants."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in graph.initializer}

    def const(self, name):
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        return numpy_helper.to_array(n.attribute[0].t) if n is not None and n.op_type == "Constant" else None

    def projection(self, name):
        """(the (B, T, D) tensor a head tensor was made from, the product of the scalar Muls on the way)."""
        scale = 1.0
        while name in self.producer and self.producer[name].op_type in HEAD_OPS:
            n = self.producer[name]
            if n.op_type == "Mul":
                c = self.const(n.input[1])
                if c is None or c.size != 1:
                    break
                scale *= float(c.reshape(-1)[0])
            name = n.input[0]
        return name, scale

    def bias_of(self, name):
        """(input, bias) when ``name`` is Add(input, 1-D constant), else None."""
        add = self.producer.get(name)
        bias = self.const(add.input[1]) if add is not None and add.op_type == "Add" else None
        return (add.input[0], bias) if bias is not None and bias.ndim == 1 else None


def attention_node(g: Graph, softmax, heads: int, index: int, fold_bias: bool, masks: dict) -> list:
    """The nodes replacing the attention around ``softmax``: a mask Cast (once per mask) and the fused node,
    which takes over the name of the subgraph's (B, T, D) output."""
    add = g.producer[softmax.input[0]]
    scores, values = g.producer[add.input[0]], g.consumers[softmax.output[0]][0]
    merged = g.consumers[g.consumers[values.output[0]][0].output[0]][0]  # Transpose, then Reshape to (B, T, D)
    assert (add.op_type, scores.op_type, values.op_type, merged.op_type) == ("Add", "MatMul", "MatMul", "Reshape")
    (q, sq), (k, sk), (v, _) = (g.projection(t) for t in (scores.input[0], scores.input[1], values.input[1]))
    where = g.producer[g.producer[add.input[1]].input[0]]  # the float mask: Unsqueeze(Where(Not(valid), ...))
    valid = g.producer[where.input[0]].input[0]
    nodes = []
    if valid not in masks:
        masks[valid] = f"{valid}_int32"
        nodes.append(helper.make_node("Cast", [valid], [masks[valid]], to=TensorProto.INT32))
    inputs, bias = [q, k, v], ""
    folded = [g.bias_of(t) for t in inputs]
    if fold_bias and all(folded):
        inputs, bias = [x for x, _ in folded], f"mha_bias_{index}"
        g.graph.initializer.append(numpy_helper.from_array(np.concatenate([b for _, b in folded]).astype(np.float32),
                                                           bias))
    out = merged.output[0]
    merged.output[0] = f"{out}_replaced"
    nodes.append(helper.make_node("MultiHeadAttention", inputs + [bias, masks[valid]], [out], domain="com.microsoft",
                                  num_heads=heads, scale=sq * sk, name=f"attention_{index}"))
    return nodes


def live_nodes_in_order(graph) -> list:
    """The graph's nodes that something still reads, in an order where every input comes first."""
    nodes = list(graph.node)
    while True:
        read = {o.name for o in graph.output} | {i for n in nodes for i in n.input}
        kept = [n for n in nodes if any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    order = []
    while nodes:
        waiting = [n for n in nodes if not all(i in ready for i in n.input)]
        assert len(waiting) < len(nodes), "cycle"
        for n in nodes:
            if n not in waiting:
                order.append(n)
                ready.update(n.output)
        nodes = waiting
    return order


def rewrite(proto, heads: int, fold_bias: bool = True) -> int:
    """Fuse every attention of ``proto`` in place; returns how many."""
    g = Graph(proto.graph)
    masks, new = {}, []
    softmaxes = [n for n in proto.graph.node if n.op_type == "Softmax"]
    for index, softmax in enumerate(softmaxes):
        new += attention_node(g, softmax, heads, index, fold_bias, masks)
    proto.graph.node.extend(new)
    order = live_nodes_in_order(proto.graph)
    del proto.graph.node[:]
    proto.graph.node.extend(order)
    _drop_unused_initializers(proto.graph)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(softmaxes)


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    heads = json.load(open(os.path.join(src, "config.json")))["model"]["n_heads"]
    proto = onnx.load(os.path.join(src, "model.onnx"))
    n = rewrite(proto, heads, fold_bias=sys.argv[3:] != ["nobias"])
    shutil.copytree(src, dst, dirs_exist_ok=True)
    onnx.save(proto, os.path.join(dst, "model.onnx"))
    print(f"{dst}: {n} attention nodes, {len(proto.graph.node)} nodes")
