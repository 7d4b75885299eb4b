"""Is the exported attention faster as one ONNX Runtime ``com.microsoft.MultiHeadAttention`` node per block?

    python experiments/ort_attention_fusion.py ONNX_DIR OUT_DIR [nobias]
    python scripts/onnx_latency.py ONNX_DIR OUT_DIR

Replaces each scaled-dot-product-attention subgraph of an exported folder (heads Reshape/Transpose, the two
scale Muls, the mask Add, Softmax, the two MatMuls) by one node taking the (B, T, D) projections, their biases
(folded unless ``nobias``) and the frames' validity mask as int32; drops what nothing reads any more. Answer:
docs/RESULTS.md, "int8 again on this host" -- no clear gain, so the exporter does not do it.
"""
import sys, os, shutil
import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

PASS = {"Mul", "Transpose", "Reshape"}

def rewrite(proto, fold_bias=True):
    g = proto.graph
    prod = {o: n for n in g.node for o in n.output}
    cons = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    inits = {i.name: i for i in g.initializer}
    def const(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        n = prod.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        return None
    def up(t):
        scale = 1.0
        while t in prod and prod[t].op_type in PASS:
            n = prod[t]
            if n.op_type == "Mul":
                c = const(n.input[1])
                if c is None or c.size != 1:
                    break
                scale *= float(c.reshape(-1)[0])
            t = n.input[0]
        return t, scale
    new_nodes, masks, count = [], {}, 0
    replaced_out = {}
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        add = prod[sm.input[0]]
        qk = prod[add.input[0]]
        av = cons[sm.output[0]][0]
        tr = cons[av.output[0]][0]
        rs = cons[tr.output[0]][0]
        assert add.op_type == "Add" and qk.op_type == "MatMul" and av.op_type == "MatMul"
        assert tr.op_type == "Transpose" and rs.op_type == "Reshape", (tr.op_type, rs.op_type)
        q, sq = up(qk.input[0]); k, sk = up(qk.input[1]); v, _ = up(av.input[1])
        unsq = prod[add.input[1]]; where = prod[unsq.input[0]]; nott = prod[where.input[0]]
        assert unsq.op_type == "Unsqueeze" and where.op_type == "Where" and nott.op_type == "Not"
        valid = nott.input[0]
        if valid not in masks:
            masks[valid] = f"{valid}_int32"
            new_nodes.append(helper.make_node("Cast", [valid], [masks[valid]], to=TensorProto.INT32))
        heads = None
        for n in cons[q]:
            if n.op_type == "Reshape":
                shape = const(n.input[1])
                heads = int(shape[2]) if shape is not None else None
        bias = ""
        ins = [q, k, v]
        if fold_bias:
            adds = [prod[t] for t in ins]
            cs = [const(a.input[1]) if a.op_type == "Add" else None for a in adds]
            if all(c is not None and c.ndim == 1 for c in cs):
                ins = [a.input[0] for a in adds]
                bname = f"mha_bias_{count}"
                g.initializer.append(numpy_helper.from_array(np.concatenate(cs).astype(np.float32), bname))
                bias = bname
        node = helper.make_node("MultiHeadAttention", ins + [bias, masks[valid]], [rs.output[0]],
                                domain="com.microsoft", num_heads=heads, scale=sq * sk,
                                name=f"attention_{count}")
        rs.output[0] = rs.output[0] + "_dead"
        new_nodes.append(node)
        count += 1
    g.node.extend(new_nodes)
    # topological re-sort + dead node elimination
    changed = True
    nodes = list(g.node)
    while changed:
        used = {o.name for o in g.output} | {i for n in nodes for i in n.input}
        kept = [n for n in nodes if any(o in used for o in n.output)]
        changed = len(kept) != len(nodes)
        nodes = kept
    # topo sort
    avail = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    order, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                order.append(n); avail.update(n.output)
            else:
                rest.append(n)
        assert len(rest) < len(pending), "cycle"
        pending = rest
    del g.node[:]
    g.node.extend(order)
    used = {i for n in order for i in n.input}
    keepi = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keepi)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count

if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    fold = len(sys.argv) < 4 or sys.argv[3] != "nobias"
    p = onnx.load(os.path.join(src, "model.onnx"))
    n = rewrite(p, fold)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    onnx.save(p, os.path.join(dst, "model.onnx"))
    print(dst, "attention nodes", n, "nodes", len(p.graph.node))
