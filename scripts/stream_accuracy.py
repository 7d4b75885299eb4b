"""Live captions against offline decoding: the bundled clips fed to the streaming engine in blocks, as the app's
Live tab and `edge-asr listen` get them, and decoded whole; WER of both against the references.

    python scripts/stream_accuracy.py [--model DIR] [--decoding greedy|lm] [--block 0.5] [--threads 2]

Also prints the engine's decode time per update (the caption's delay behind the audio, beyond the block wait).
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from asr_core.audio import load_audio
from asr_core.evaluation import error_rates
from asr_core.streaming import PARTIALS, StreamingRecognizer, StreamSettings
from asr_core.transcribe import Transcriber

CLIPS = Path(__file__).resolve().parent.parent / "assets" / "clips"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--decoding", choices=("greedy", "lm"), default="lm")
    parser.add_argument("--block", type=float, default=0.5, help="seconds of audio per block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--partials", choices=PARTIALS, default="greedy",
                        help="the partial text's decoder: greedy (the default) or the same as the committed lines'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transcriber = Transcriber.from_folder(args.model, decoding=args.decoding)
    block = int(args.block * 16000)
    references, offline, streamed, decode_seconds = [], [], [], []
    for clip in json.loads((CLIPS / "clips.json").read_text()):
        samples = load_audio(str(CLIPS / clip["file"]))
        engine = StreamingRecognizer(transcriber, StreamSettings(partials=args.partials))
        for start in range(0, len(samples), block):
            update = engine.feed(samples[start:start + block])
            if update is not None:
                decode_seconds.append(update.decode_seconds)
        references.append(clip["text"])
        offline.append(transcriber.transcribe(samples))
        streamed.append(" ".join(engine.finish().committed))
    print(f"{len(references)} clips, {args.decoding}, partials {args.partials}, {args.block:g} s blocks, "
          f"{args.threads} threads")
    print(f"offline WER {error_rates(references, offline)['wer']:.2%}, "
          f"streamed WER {error_rates(references, streamed)['wer']:.2%}")
    print(f"decode per update: median {1000 * statistics.median(decode_seconds):.0f} ms, "
          f"max {1000 * max(decode_seconds):.0f} ms")


if __name__ == "__main__":
    main()
