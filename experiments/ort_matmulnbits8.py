"""Would ONNX Runtime's 8-bit ``MatMulNBits`` (accuracy level 4: int8 activations rounded per block of K, so
finer than per row) be a faster way to give the int8 export per-row activation scales than the per-row
quantizer nodes (``edge-asr export --activations per-row``)?

    python experiments/ort_matmulnbits8.py [--threads 2] [--frames 300]

One node at a time, on random symmetric int8 codes with one scale per output row (an int8 artifact's form), at
the model's three Linear shapes (K x N) and a 6 s clip's 300 frames: ``MatMulNBits`` bits=8 with the row scale
repeated over blocks of 32..K (codes stored +128, the kernel's default zero point: the same weights, no second
rounding), against ``DynamicQuantizeMatMul`` (per-tensor activations, what the per-tensor export fuses to).
Prints the largest error relative to the fp32 product and the mean time of 40 runs after 3 warm-ups. Answer:
**no** -- about 2x slower than the per-tensor kernel at every shape and block (RESULTS.md, "ONNX Runtime").
"""
import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(512, 2048), (2048, 512), (512, 512)]  # (K, N): FFN up, FFN down, attention projections


def _model(node, inits, k: int, n: int):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, None, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def nbits8(codes: np.ndarray, scales: np.ndarray, block: int):
    """codes (N, K) int8, scales (N,) -> MatMulNBits bits=8 at accuracy level 4."""
    n, k = codes.shape
    blocks = k // block
    stored = (codes.astype(np.int16) + 128).astype(np.uint8).reshape(n, blocks, block)
    per_block = np.repeat(scales[:, None], blocks, axis=1).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=8,
                            block_size=block, accuracy_level=4)
    return _model(node, [numpy_helper.from_array(stored, "B"), numpy_helper.from_array(per_block, "S")], k, n)


def dynamic_int8(codes: np.ndarray, scales: np.ndarray):
    n, k = codes.shape
    node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "S"], ["Y"], domain="com.microsoft")
    inits = [numpy_helper.from_array(np.ascontiguousarray(codes.T), "B"), numpy_helper.from_array(scales, "S")]
    return _model(node, inits, k, n)


def measure(model, a: np.ndarray, reference: np.ndarray, threads: int) -> tuple[float, float]:
    """(max |error| / max |reference|, mean ms per run)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"A": a})[0]
    for _ in range(3):
        session.run(None, {"A": a})
    start = time.perf_counter()
    for _ in range(40):
        session.run(None, {"A": a})
    return float(np.abs(y - reference).max() / np.abs(reference).max()), (time.perf_counter() - start) / 40 * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frames", type=int, default=300)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print("K     N     kernel                 rel. error  ms")
    for k, n in SHAPES:
        codes = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
        scales = ((rng.random(n) + 0.5) / 127).astype(np.float32)
        a = rng.standard_normal((1, args.frames, k)).astype(np.float32)
        reference = a @ (codes.astype(np.float32) * scales[:, None]).T
        runs = [(f"MatMulNBits8 block {b}", nbits8(codes, scales, b)) for b in (32, 128, 256, k)]
        runs.append(("DynamicQuantizeMatMul", dynamic_int8(codes, scales)))
        for label, model in runs:
            error, ms = measure(model, a, reference, args.threads)
            print(f"{k:<5} {n:<5} {label:<22} {error:.4f}      {ms:.2f}")


if __name__ == "__main__":
    main()
