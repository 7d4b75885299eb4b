"""Choose the WiSE-FT fractions of a Whisper-initialised model: greedy WER for each (weight, lower weight).

The fine-tuned model and the audio are loaded once; each setting is applied to a copy in memory (what
`edge-asr wise-ft` would write) and decoded greedily. Sweep on a tuning slice (e.g. the first 100 dev utterances),
then write the winner with `edge-asr wise-ft` and report it on the rest.

    python scripts/wise_sweep.py --model runs/stage2 --data ../shared/data/librispeech-mini/dev-clean-2-a \\
        --limit 100 --weight 0 0.1 0.15 0.2 --lower-weight 0.15 0.3 0.4 0.5 --out runs/wise_sweep.json
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import time

import torch

from asr_core.audio import load_audio
from asr_core.checkpoint import load_model
from asr_core.data import load_utterances
from asr_core.evaluation import error_rates
from asr_core.transcribe import Transcriber
from asr_core.whisper_init import packaged_whisper_for, resolve_whisper_source, wise_ft


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="fine-tuned model folder (default: the shipped baseline)")
    parser.add_argument("--init-from", default=None,
                        help="the Whisper weights it started from (default: by the model's width)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--weight", nargs="+", type=float, default=[0.0, 0.1, 0.15, 0.2])
    parser.add_argument("--lower-weight", nargs="+", type=float, default=None,
                        help="fractions for the stem and lower half of the blocks (default: the same as --weight)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tuned, tokenizer = load_model(args.model)  # fp32
    source = resolve_whisper_source(args.init_from or packaged_whisper_for(tuned))
    utts = load_utterances(args.data, args.limit)
    audio = [load_audio(u.audio_path, allow_silence=True) for u in utts]
    refs = [u.text for u in utts]
    pairs = ([(w, w) for w in args.weight] if args.lower_weight is None
             else list(itertools.product(args.weight, args.lower_weight)))
    results = []
    for weight, lower in pairs:
        start = time.perf_counter()
        model = copy.deepcopy(tuned)
        wise_ft(model, source, weight, lower)
        transcriber = Transcriber(model, tokenizer)
        rates = error_rates(refs, [transcriber.transcribe(a) for a in audio])
        results.append({"weight": weight, "lower_weight": lower, "wer": rates["wer"], "cer": rates["cer"]})
        print(f"weight {weight:g}  lower {lower:g}: WER {rates['wer']:.2%}  CER {rates['cer']:.2%}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    best = min(results, key=lambda r: r["wer"])
    print(f"best: weight {best['weight']:g}, lower weight {best['lower_weight']:g} ({best['wer']:.2%}) on "
          f"{len(utts)} utterances; write it with `edge-asr wise-ft --weight {best['weight']:g} "
          f"--lower-weight {best['lower_weight']:g} --out DIR`")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "n_utterances": len(utts), "grid": results, "best": best}, f, indent=2)


if __name__ == "__main__":
    main()
