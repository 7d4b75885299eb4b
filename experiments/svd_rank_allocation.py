"""Would SVD-LLM do better at the same size if the ranks were shared out across layers, not set per layer?

`svd:energy=0.9` gives every Linear the rank its own weight spectrum keeps at 90% energy, then truncates the
whitened product W·S (S Sᵀ the input covariance) at that rank. The whitened spectrum says how much output error
each kept direction saves on calibration inputs (truncation error = the dropped σ² of W·S), so one global
threshold on "share of the layer's output energy saved per parameter" (σᵢ² / Σσ² / (in + out)) spends the same
parameter budget where it saves the most relative output error. This compares the two at the budget of the
given energies (statistics collected once, on the bundled set; in memory; greedy). Run on the tuning slice
(the first 100 dev utterances).

    python experiments/svd_rank_allocation.py --data dev100.jsonl --energy 0.9
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import compression.calibrated as calibrated
import compression.calibration as calibration
from asr_core.audio import load_audio
from asr_core.checkpoint import load_model
from asr_core.data import load_utterances
from asr_core.evaluation import error_rates
from asr_core.transcribe import Transcriber
from compression.compress import apply_recipe
from compression.methods import DEFAULT_SKIP, SVDSettings, apply_svd, target_layers
from compression.recipe import parse_recipe


def greedy_wer(model, tokenizer, audio, refs) -> dict:
    transcriber = Transcriber(model.eval(), tokenizer)
    return error_rates(refs, [transcriber.transcribe(a) for a in audio])


def spectra(model, stats) -> dict[str, tuple[int, int, torch.Tensor, torch.Tensor]]:
    """name -> (out, in, σ of W·S, σ of W) for every Linear svd would factorise."""
    out = {}
    for name, m in target_layers(model, DEFAULT_SKIP):
        if isinstance(m, nn.Linear):
            s = calibrated.layer_stats(stats, name, m)
            _, _, sigma, _, weight_sigma = calibrated._whitened_svd(m.weight.detach().float(), s, name)
            out[name] = (*m.weight.shape, sigma, weight_sigma)
    return out


def cost(out_f: int, in_f: int, rank: int) -> int:
    """Parameters of the layer at this rank (whole when factorising would not save any)."""
    return min(rank * (in_f + out_f), in_f * out_f)


def energy_ranks(spec, energy: float) -> dict[str, int]:
    """The default: each layer's rank from its weight spectrum at this energy (as svd_rank)."""
    ranks = {}
    for name, (_, _, _, ws) in spec.items():
        share = torch.cumsum(ws ** 2, 0) / (ws ** 2).sum()
        ranks[name] = int((share < energy - 1e-7).sum().item()) + 1
    return ranks


def global_ranks(spec, budget: int) -> dict[str, int]:
    """Ranks from one threshold on σᵢ² / Σσ² / (in + out) of the whitened spectra, the largest set within budget."""
    scores = {n: (sig ** 2 / (sig ** 2).sum()) / (i + o) for n, (o, i, sig, _) in spec.items()}

    def ranks_at(tau: float) -> dict[str, int]:
        return {n: max(1, int((sc > tau).sum().item())) for n, sc in scores.items()}

    def total(ranks) -> int:
        return sum(cost(o, i, ranks[n]) for n, (o, i, _, _) in spec.items())
    lo, hi = 1e-16, 1.0  # total(ranks_at(hi)) is the minimum; bisect tau in log space
    for _ in range(80):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if total(ranks_at(mid)) > budget else (lo, mid)
    return ranks_at(hi)


def factorised(model, stats, ranks: dict[str, int]):
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        apply_svd(model, SVDSettings(rank=rank), [(name, modules[name])], stats)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="manifest or folder to decode (the tuning slice)")
    parser.add_argument("--energy", nargs="+", type=float, default=[0.9])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(None)
    utts = load_utterances(args.data, None)
    audio = [load_audio(u.audio_path, allow_silence=True) for u in utts]
    refs = [u.text for u in utts]
    stats = calibration.bundled_stats(model)
    spec = spectra(model, stats)
    dense = sum(o * i for o, i, _, _ in spec.values())
    base = greedy_wer(model, tokenizer, audio, refs)
    print(f"fp32: WER {base['wer']:.2%}  CER {base['cer']:.2%}  ({len(spec)} Linears, {dense / 1e6:.2f} M weights)")
    for energy in args.energy:
        default = energy_ranks(spec, energy)
        budget = sum(cost(o, i, default[n]) for n, (o, i, _, _) in spec.items())
        shared = global_ranks(spec, budget)
        for label, ranks in (("per-layer energy", default), ("global threshold", shared)):
            start = time.perf_counter()
            if label == "per-layer energy":  # the shipped path, to check the harness reproduces it
                compressed = apply_recipe(model, parse_recipe(f"svd:energy={energy}"), stats=stats)
            else:
                compressed = factorised(model, stats, ranks)
            used = sum(cost(o, i, ranks[n]) for n, (o, i, _, _) in spec.items())
            rates = greedy_wer(compressed, tokenizer, audio, refs)
            whole = sum(cost(o, i, ranks[n]) == o * i for n, (o, i, _, _) in spec.items())
            print(f"energy {energy:g}, {label}: {used / 1e6:.2f} M of {dense / 1e6:.2f} M Linear weights, "
                  f"{whole} layers whole; WER {rates['wer']:.2%} ({rates['wer'] / base['wer'] - 1:+.1%})  "
                  f"CER {rates['cer']:.2%}  ({time.perf_counter() - start:.0f} s)", flush=True)
        kinds: dict[str, list[int]] = {}
        for n, r in shared.items():
            kinds.setdefault(n.split(".", 2)[-1], []).append(r)
        print("  global ranks by layer kind (min/median/max): " + "; ".join(
            f"{k} {min(v)}/{sorted(v)[len(v) // 2]}/{max(v)}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
