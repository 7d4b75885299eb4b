"""Did choosing SparseGPT's block mask by ``kthvalue`` (instead of ``topk``), handing k-means a fresh sort as it
came (instead of widening its kept int32 copy) and warming up only the acoustic model (instead of a whole LM
decode) make the studio's calibrated "Combined" knob change faster?

    python experiments/knob_change_ab.py [--values 0.56 0.58 ...] [--threads 2]

One process, one studio (start-up and every default row built first, so the calibration factors are cached as on
the page); then for each knob value one change the way it was done before (A) and one as now (B), their order
alternating, each at its own value so that every change builds. Prints each time and the medians.
"""
import argparse
import statistics
import time

import torch

import studio as app
from asr_core.evaluation import timed_decode
from asr_core.transcribe import Transcriber
from compression import calibrated, obs
from compression.methods import sort_order


def topk_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """The mask choice before: ``topk`` of the lowest ``count`` of each row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, score.topk(count, dim=1, largest=False).indices, True)
    return mask


def kept_sort_before(s, name: str, values: torch.Tensor) -> torch.Tensor:
    """k-means' sort as before: always the kept int32 copy, widened."""
    values = values.detach().float().reshape(-1)
    return calibrated.kept_for_layer(s, ("kmeans-sort", name), calibrated.weight_digest(values),
                                     lambda: sort_order(values).to(torch.int32)).long()


def measure_before(studio: app.Studio, recipe: str, samples) -> None:
    """Studio.measure as it was: a whole decode (LM beam search included) as the warm-up."""
    variant = studio.variant(recipe)
    greedy = studio.runner(variant, "torch")
    transcriber = Transcriber(greedy.model, studio.tokenizer, decoder=studio.decoder_for(greedy, True))
    transcriber.transcribe(samples)
    app.median_seconds(lambda: timed_decode(transcriber, samples)[2], studio.timed_runs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--values", type=float, nargs="+", default=[0.56, 0.58, 0.6, 0.62, 0.64, 0.66, 0.68, 0.7])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    studio = app.Studio(None)
    samples = studio.load_clip(str(app.ASSETS / "clips" / "1272-135031-0000.opus"))
    for spec in app.VARIANTS:
        if spec.enabled:
            studio.measure(spec.recipe(spec.default), samples, None)
    now_lowest, now_sort, times = obs.lowest_entries, calibrated.kept_sort, {"A": [], "B": []}
    for i, value in enumerate(args.values):
        for arm in ("A", "B") if i % 2 == 0 else ("B", "A"):
            recipe = app.SPECS["combined"].recipe(value + (0.001 if arm == "B" else 0.0), "calibrated")
            obs.lowest_entries = topk_lowest if arm == "A" else now_lowest
            calibrated.kept_sort = kept_sort_before if arm == "A" else now_sort
            start = time.perf_counter()
            measure_before(studio, recipe, samples) if arm == "A" else studio.measure(recipe, samples, None)
            times[arm].append(time.perf_counter() - start)
            print(f"{arm} combined={value}: {times[arm][-1]:.2f} s", flush=True)
    before, now = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"median before (A) {before:.2f} s, now (B) {now:.2f} s, now/before {now / before:.2f}")


if __name__ == "__main__":
    main()
