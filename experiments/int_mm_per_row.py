"""Per-row int8 activations in torch: ``torch._int_mm`` against torch's dynamic int8 Linear, on the shipped model's
layer shapes (the experiment behind ``compression.quantize.PerRowInt8Linear``, int8:algo=gptq's runtime).

    python experiments/int_mm_per_row.py [--threads 2] [--frames 160]

torch's dynamic int8 Linear (torch.ao, deprecated upstream) rounds activations with one scale per call. The ONNX
export's per-row option (one scale per frame) took the int8 artifact from +2.3% to -0.1% relative WER on the 457
held-out utterances (docs/RESULTS.md). This times the same idea in torch: symmetric per-row int8 activations,
``torch._int_mm`` (int8 x int8 -> int32), then the row and channel scales; and the error of each against the
float product on activations with one loud frame. Exactness of ``_int_mm`` on CPUs without VNNI is not checked
here.
"""
import argparse
import time
import warnings

import torch


def timed(fn, runs=200):
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=160, help="rows of the activation (frames after subsampling)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for k, n in ((512, 512), (512, 2048), (2048, 512)):
        a = torch.randn(args.frames, k)
        a[3] *= 30  # one loud frame
        linear = torch.nn.Linear(k, n, bias=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                             dtype=torch.qint8)
        w_scale = linear.weight.abs().amax(1) / 127
        w_q = torch.round(linear.weight / w_scale[:, None]).to(torch.int8).T.contiguous()

        def per_row():
            scale = a.abs().amax(1, keepdim=True) / 127
            return torch._int_mm(torch.round(a / scale).to(torch.int8), w_q).float() * scale * w_scale

        with torch.no_grad():
            exact = linear(a)
            quiet = torch.ones(args.frames, dtype=torch.bool)
            quiet[3] = False
            errors = {name: float((f() - exact)[quiet].abs().mean() / exact[quiet].abs().mean())
                      for name, f in (("dynamic", lambda: dynamic(a)), ("per-row", per_row))}
            times = {name: timed(f) for name, f in (("fp32", lambda: linear(a)), ("dynamic", lambda: dynamic(a)),
                                                    ("per-row", per_row))}
        print(f"({args.frames}, {k}) @ ({k}, {n}): fp32 {times['fp32']:.0f} us, dynamic int8 {times['dynamic']:.0f} us "
              f"(error on the quiet frames {100 * errors['dynamic']:.2f}%), per-row _int_mm {times['per-row']:.0f} us "
              f"({100 * errors['per-row']:.2f}%)")


if __name__ == "__main__":
    main()
