"""Grid-search the LM weight (alpha) and word bonus (beta) of beam-search decoding on a tuning set.

Log-probs are computed once per utterance, then every (LM, alpha, beta) is decoded from them in parallel
processes. Tune on a slice (e.g. the first 100 dev utterances) and report on the rest, so that the reported
figure is not the one that was tuned.

    python scripts/tune_lm.py --model checkpoints/conformer-ctc-whisper-base \
        --data ../shared/data/librispeech-mini/dev-clean-2-a --limit 100 --lm runs/lm/lm.arpa.gz \
        --alpha 0.3 0.5 0.7 0.9 --beta 0 1 2 --unk-penalty 0 10 --blank-penalty 0 1 --beam 32 128 \
        --out runs/lm/tune.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor

import torch

from asr_core.audio import load_audio
from asr_core.beam_search import BeamSearchDecoder, BeamSettings
from asr_core.data import load_utterances
from asr_core.evaluation import error_rates
from asr_core.lm import NGramLM
from asr_core.text import CharTokenizer
from asr_core.transcribe import Transcriber

_STATE: dict = {}
# one grid point: these names are BeamSettings fields, except "lm" (the ARPA file)
GRID = ("lm", "alpha", "beta", "unk_penalty", "blank_penalty", "temperature", "beam_width",
        "beam_prune_logp")


def _init(log_probs, tokenizer_json):
    _STATE["log_probs"] = log_probs
    _STATE["tokenizer"] = CharTokenizer.from_json(tokenizer_json)
    _STATE["lms"] = {}


def _decode(job: dict):
    settings = dict(job)
    lm_path = settings.pop("lm")
    lms = _STATE["lms"]
    if lm_path not in lms:
        lms[lm_path] = NGramLM.read_arpa(lm_path)
    decoder = BeamSearchDecoder(_STATE["tokenizer"], lms[lm_path], BeamSettings(**settings))
    return [decoder(lp) for lp in _STATE["log_probs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N utterances")
    parser.add_argument("--lm", nargs="+", required=True)
    parser.add_argument("--alpha", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--beta", nargs="+", type=float, default=[0.0, 1.0, 2.0])
    parser.add_argument("--unk-penalty", nargs="+", type=float, default=[0.0])
    parser.add_argument("--blank-penalty", nargs="+", type=float, default=[0.0])
    parser.add_argument("--temperature", nargs="+", type=float, default=[1.0])
    parser.add_argument("--beam", nargs="+", type=int, default=[32])
    parser.add_argument("--beam-prune", nargs="+", type=float, default=[-12.0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.processes)
    utts = load_utterances(args.data)[args.skip:]
    utts = utts[: args.limit] if args.limit else utts
    transcriber = Transcriber.from_folder(args.model, decoding="greedy")
    log_probs = [transcriber.log_probs(load_audio(u.audio_path, allow_silence=True)) for u in utts]
    refs = [u.text for u in utts]
    greedy = error_rates(refs, [transcriber.greedy(lp) for lp in log_probs])
    print(f"greedy: WER {greedy['wer']:.2%} CER {greedy['cer']:.2%} ({len(utts)} utterances)", flush=True)
    jobs = [dict(zip(GRID, values)) for values in itertools.product(
        args.lm, args.alpha, args.beta, args.unk_penalty, args.blank_penalty, args.temperature, args.beam,
        args.beam_prune)]
    results = []
    with ProcessPoolExecutor(args.processes, initializer=_init,
                             initargs=(log_probs, transcriber.tokenizer.to_json())) as pool:
        for job, hyps in zip(jobs, pool.map(_decode, jobs)):
            rates = error_rates(refs, hyps)
            results.append({**job, "wer": rates["wer"], "cer": rates["cer"]})
            setting = " ".join(f"{name} {value}" for name, value in job.items() if name != "lm")
            print(f"{os.path.basename(job['lm'])} {setting}: WER {rates['wer']:.2%} CER {rates['cer']:.2%}",
                  flush=True)
    best = min(results, key=lambda r: r["wer"])
    print(f"best: {best}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"greedy": greedy, "n_utterances": len(utts), "grid": results, "best": best}, f, indent=2)


if __name__ == "__main__":
    main()
