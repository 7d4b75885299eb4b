"""After parallel GPU runs: score every candidate (best/, averaged/, last/ of each run) on the dev set, and
export the winner as fp16 safetensors shards small enough for the device's 16 MiB-per-file return limit.

    python scripts/gpu_pick_export.py runs/gpu_* --dev .gpu/dev --out $OUT
    python scripts/gpu_pick_export.py --join $OUT --out checkpoints/conformer-ctc-whisper-tiny   # back home
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from asr_core.checkpoint import CONFIG, VOCAB, WEIGHTS, load_model, read_config
from asr_core.data import BucketBatchSampler, SpeechDataset, collate, load_utterances
from asr_core.decoding import GreedyDecoder
from asr_core.evaluation import decode_batches, error_rates

SHARD_BYTES = 15 * 2**20


def score(folder: str, dev: str, device: str) -> dict:
    model, tokenizer = load_model(folder)
    utts = load_utterances(dev)
    data = SpeechDataset(utts, model.cfg.features, tokenizer)
    loader = DataLoader(data, batch_sampler=BucketBatchSampler([u.duration for u in utts], 240.0, shuffle=False),
                        collate_fn=collate)
    hyps = decode_batches(model.to(device), GreedyDecoder(tokenizer), loader, device)
    return error_rates([u.text for u in utts], [hyps[u.id] for u in utts])


def export_shards(folder: str, out: str, extra: dict) -> None:
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(os.path.join(folder, WEIGHTS)).items()}
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor.contiguous()
        size += nbytes
    shards.append(current)
    for n, shard in enumerate(shards):
        save_file(shard, os.path.join(out, f"model.part{n}.safetensors"))
    config = read_config(folder)
    config.update(extra)
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copyfile(os.path.join(folder, VOCAB), os.path.join(out, VOCAB))


def join_shards(parts_dir: str, out: str) -> None:
    state = {}
    for name in sorted(os.listdir(parts_dir)):
        if name.startswith("model.part") and name.endswith(".safetensors"):
            state.update(load_file(os.path.join(parts_dir, name)))
    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, WEIGHTS))
    for name in (CONFIG, VOCAB):
        shutil.copyfile(os.path.join(parts_dir, name), os.path.join(out, name))
    load_model(out)  # fails loudly if anything is missing or mismatched
    print(f"joined {len(state)} tensors into {out}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="*", help="training output folders")
    parser.add_argument("--dev", help="dev data to pick on")
    parser.add_argument("--out", required=True)
    parser.add_argument("--join", help="a folder of model.partN.safetensors to join into --out")
    args = parser.parse_args()
    if args.join:
        join_shards(args.join, args.out)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for run in args.runs:
        for kind in ("best", "averaged", "last"):
            folder = os.path.join(run, kind)
            if os.path.exists(os.path.join(folder, WEIGHTS)):
                rates = score(folder, args.dev, device)
                results.append({"folder": folder, **rates})
                print(f"{folder}: WER {rates['wer']:.2%} CER {rates['cer']:.2%}", flush=True)
    if not results:
        raise SystemExit("no candidate model found")
    winner = min(results, key=lambda r: (r["wer"], r["cer"]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"candidates": results, "winner": winner}, f, indent=2)
    export_shards(winner["folder"], args.out, {"selection": {"dev": args.dev, **winner,
                                                             "candidates": len(results)}})
    print(f"winner {winner['folder']}: WER {winner['wer']:.2%} CER {winner['cer']:.2%}")


if __name__ == "__main__":
    main()
