"""Distillation recovery curve: compress, distil from the uncompressed model, WER after each time budget.

    python scripts/recovery_curve.py --recipe structured:fraction=0.3 --minutes 5 10 20 40 \
        --data ../shared/data/librispeech-mini/train-clean-5 --dev DEV_MANIFEST --out runs/recovery_structured

One run of max(--minutes) minutes (cosine schedule over the whole run); at each mark the model as it is then is
saved as an artifact (``OUT/after_{m}min``), the time spent saving not counted as training. When training ends,
every snapshot (and the untrained compressed model, ``after_0min``) is evaluated greedy on --dev, and a table
is printed and written to ``OUT/curve.json``. Distillation needs no transcripts: --data may be any audio.
The calibrated algorithms start from --calib (default: the bundled 32 clips), as ``edge-asr compress`` does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from compression.cli import add_calibration_flags, calibration_stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="baseline folder (default: the shipped one)")
    p.add_argument("--recipe", required=True)
    p.add_argument("--minutes", type=float, nargs="+", required=True, help="marks, in training minutes")
    p.add_argument("--data", required=True, help="training audio (any; transcripts not needed)")
    p.add_argument("--dev", required=True, help="evaluation data (LibriSpeech folder or manifest)")
    p.add_argument("--dev-limit", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-seconds", type=float, default=90.0)
    p.add_argument("--dropout", type=float, default=None,
                   help="the student's dropout while it learns (default 0: the teacher's function has none)")
    p.add_argument("--freeze-layers", type=int, default=None,
                   help="blocks kept fixed (default: as the model was trained, from its config.json)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="speed perturbation and SpecAugment while distilling (default: off, as compress --distill)")
    p.add_argument("--distill-hidden", type=float, default=0.0,
                   help="layer matching: every block's output against the teacher's, with this weight (default 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="bf16 autocast (default: as the baseline was trained; ~1.7x faster on avx512_bf16 CPUs)")
    p.add_argument("--out", required=True)
    add_calibration_flags(p)
    args = p.parse_args(argv)

    from asr_core.checkpoint import default_model_dir, load_model
    from asr_core.data import load_utterances, read_audio_files
    from asr_core.evaluation import evaluate
    from compression.artifact import save_artifact
    from compression.compress import apply_recipe, finetune, trained_freeze_layers
    from compression.recipe import parse_recipe

    torch.set_num_threads(args.threads)
    recipe = parse_recipe(args.recipe)
    marks = sorted(args.minutes)
    model_dir = args.model or default_model_dir()
    base, tokenizer = load_model(model_dir)
    frozen = trained_freeze_layers(model_dir) if args.freeze_layers is None else args.freeze_layers
    student = apply_recipe(base, recipe, progress=True, stats=calibration_stats(args, base, [recipe]))
    os.makedirs(args.out, exist_ok=True)
    save_artifact(student, os.path.join(args.out, "after_0min"), tokenizer, recipe.to_json())
    pending = list(marks)

    def on_step(state):
        while pending and state["train_seconds"] >= 60 * pending[0]:
            mark = pending.pop(0)
            save_artifact(student, os.path.join(args.out, f"after_{mark:g}min"), tokenizer, recipe.to_json(),
                          extra={"finetune": {"distill": True, "minutes": mark, "steps": state["step"]}})
            print(f"snapshot after {mark:g} min (step {state['step']})", flush=True)

    start = time.perf_counter()
    summary = finetune(student, tokenizer, read_audio_files(args.data), [], minutes=marks[-1], lr=args.lr,
                       batch_seconds=args.batch_seconds, freeze_layers=frozen, teacher=base,
                       distill=True, on_step=on_step, precision=args.precision,
                       dropout=args.dropout, augment=args.augment, hidden_weight=args.distill_hidden)
    if pending:  # the budget ran out between the last step and the mark
        on_step({**summary, "train_seconds": 60 * pending[-1]})
    print(f"trained {summary['step']} steps in {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    from asr_core.transcribe import Transcriber

    dev = load_utterances(args.dev, args.dev_limit)
    rows = []
    for mark in [0.0] + marks:
        folder = os.path.join(args.out, f"after_{mark:g}min")
        model, tok = load_model(folder)
        result = evaluate(Transcriber(model, tok), dev, progress=False)
        rows.append({"minutes": mark, "wer": result["wer"], "cer": result["cer"], "folder": folder})
        print(f"{mark:5g} min  WER {result['wer']:.2%}  CER {result['cer']:.2%}", flush=True)
    with open(os.path.join(args.out, "curve.json"), "w") as f:
        json.dump({"recipe": recipe.describe(), "data": args.data, "dev": args.dev, "lr": args.lr,
                   "calib": args.calib, "calib_utterances": args.calib_utterances,
                   "freeze_layers": frozen, "dropout": summary["dropout"],
                   "augment": summary["augment"], "hidden_weight": args.distill_hidden, "precision": args.precision,
                   "steps": summary["step"], "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
