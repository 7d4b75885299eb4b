"""The beam search's per-frame token cap (``token_max`` in decoding.json): WER with the word LM on a manifest
and the decode time of damaged variants on the bundled 10.9 s clip, for each cap.

    python scripts/token_cap.py --data dev100.jsonl --caps 0 8 12 16 [--threads 2]

The log-probs are computed once per utterance; only the search is timed. How the shipped cap (12) was chosen:
docs/RESULTS.md, "Beam search with the word LM".
"""
import argparse
import time

import torch

import studio as app
from asr_core.audio import load_audio
from asr_core.beam_search import BeamSearchDecoder, BeamSettings
from asr_core.checkpoint import default_model_dir
from asr_core.data import read_manifest
from asr_core.evaluation import error_rates
from asr_core.transcribe import Transcriber
from compression.artifact import to_runtime
from compression.compress import apply_recipe
from compression.recipe import parse_recipe

DAMAGED = ("prune:sparsity=0.55,algo=magnitude+kmeans:clusters=16,algo=lloyd+int8:algo=rtn",
           "svd:energy=0.91,algo=weight")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="manifest (.jsonl) or LibriSpeech folder with transcripts")
    parser.add_argument("--caps", type=int, nargs="+", default=[0, 12])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = default_model_dir()
    baseline = Transcriber.from_folder(folder, decoding="greedy")
    utterances = read_manifest(args.data)
    log_probs = [baseline.log_probs(load_audio(u.audio_path)) for u in utterances]
    studio = app.Studio(None)
    clip = studio.load_clip(str(app.ASSETS / "clips" / "1272-135031-0000.opus"))
    damaged = [Transcriber(to_runtime(apply_recipe(studio.base, parse_recipe(r), stats=studio.stats)),
                           studio.tokenizer).log_probs(clip) for r in DAMAGED]
    for cap in args.caps:
        settings = BeamSettings.for_folder(folder, token_max=cap)
        decoder = BeamSearchDecoder.from_folder(folder, baseline.tokenizer, settings)
        start = time.perf_counter()
        texts = [decoder(lp) for lp in log_probs]
        seconds = time.perf_counter() - start
        rates = error_rates([u.text for u in utterances], texts)
        times = []
        for lp in damaged:
            start = time.perf_counter()
            decoder(lp)
            times.append(time.perf_counter() - start)
        print(f"token_max={cap}: WER {100 * rates['wer']:.2f}% CER {100 * rates['cer']:.2f}%, search {seconds:.1f} s "
              f"for {len(utterances)} utterances; damaged variants on the clip: "
              + ", ".join(f"{r.split(':')[0]} {t:.2f} s" for r, t in zip(DAMAGED, times)), flush=True)


if __name__ == "__main__":
    main()
