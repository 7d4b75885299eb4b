"""After parallel GPU runs: score every candidate (best/, averaged/, last/ of each run) on the dev set, and
export the best candidate of each of the ``--top`` best runs as an fp16 model folder ``OUT/<run>/``
(gpu_train.sh tars and splits them for the device's 16 MiB-per-file return limit), with ``summary.json``.

    python scripts/gpu/gpu_pick_export.py runs/gpu_* --dev .gpu/dev --out runs/export --top 2
    python scripts/gpu/gpu_pick_export.py --join PARTS --out FOLDER   # older sharded exports: join model.partN

``--delta-from INIT`` leaves out of each export the tensors that are bit for bit those of the INIT model folder
the runs started from (the frozen part: 20 MB of int8 for Whisper base), so that two runs' models fit the 64 MiB
the device sends back; the names left out are listed in the export's config.json under ``delta_from``. Back here
the same INIT folder fills them in:

    python scripts/gpu/gpu_pick_export.py --fill runs/export/RUN --out runs/RUN-full   # [--base INIT] if it moved
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

def score(folder: str, dev: str, device: str) -> dict:
    model, tokenizer = load_model(folder)
    utts = load_utterances(dev)
    data = SpeechDataset(utts, model.cfg.features, tokenizer)
    loader = DataLoader(data, batch_sampler=BucketBatchSampler([u.duration for u in utts], 240.0, shuffle=False),
                        collate_fn=collate)
    hyps = decode_batches(model.to(device), GreedyDecoder(tokenizer), loader, device)
    return error_rates([u.text for u in utts], [hyps[u.id] for u in utts])


def export_half(folder: str, out: str, extra: dict, delta_from: str | None = None) -> None:
    """``folder``'s model with fp16 weights (as shipped) into ``out``; ``extra`` is merged into its config.
    With ``delta_from``, the tensors identical to that model folder's are left out (``fill`` puts them back)."""
    os.makedirs(out, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(os.path.join(folder, WEIGHTS)).items()}
    config = read_config(folder)
    if delta_from:
        base = load_file(os.path.join(delta_from, WEIGHTS))
        same = sorted(k for k, v in state.items()
                      if k in base and base[k].dtype == v.dtype and torch.equal(base[k], v))
        state = {k: v for k, v in state.items() if k not in same}
        config["delta_from"] = {"folder": delta_from, "names": same}
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, WEIGHTS))
    config.update(extra)
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copyfile(os.path.join(folder, VOCAB), os.path.join(out, VOCAB))


def fill(delta: str, out: str, base: str | None = None) -> None:
    """A whole model folder from an export made with ``--delta-from``: the left-out tensors come from ``base``
    (default: the folder named in the export's config)."""
    config = read_config(delta)
    record = config.pop("delta_from", None)
    if record is None:
        raise SystemExit(f"{delta} is a whole model already (its config.json has no delta_from)")
    base = base or record["folder"]
    reference = load_file(os.path.join(base, WEIGHTS))
    missing = [name for name in record["names"] if name not in reference]
    if missing:
        raise SystemExit(f"{base} lacks {len(missing)} of the left-out tensors (e.g. {missing[0]}): not the run's INIT")
    state = load_file(os.path.join(delta, WEIGHTS))
    state.update({name: reference[name] for name in record["names"]})
    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, WEIGHTS))
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copyfile(os.path.join(delta, VOCAB), os.path.join(out, VOCAB))
    load_model(out)  # fails loudly if anything is missing or mismatched
    print(f"{out}: {len(state)} tensors, {len(record['names'])} of them from {base}")


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
    parser.add_argument("--top", type=int, default=2, help="export the best model of this many runs")
    parser.add_argument("--join", help="a folder of model.partN.safetensors to join into --out")
    parser.add_argument("--delta-from", metavar="INIT",
                        help="leave out of the exports the tensors identical to this model folder's")
    parser.add_argument("--fill", metavar="EXPORT", help="an export made with --delta-from, to make whole in --out")
    parser.add_argument("--base", help="with --fill: the INIT folder, if not where the export's config says")
    args = parser.parse_args()
    if args.join:
        join_shards(args.join, args.out)
        return
    if args.fill:
        fill(args.fill, args.out, args.base)
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
    best_per_run = {}
    for r in results:
        run = os.path.dirname(r["folder"])
        if run not in best_per_run or (r["wer"], r["cer"]) < (best_per_run[run]["wer"], best_per_run[run]["cer"]):
            best_per_run[run] = r
    ranked = sorted(best_per_run.values(), key=lambda r: (r["wer"], r["cer"]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"candidates": results, "ranked": ranked}, f, indent=2)
    for r in ranked[: args.top]:
        target = os.path.join(args.out, os.path.basename(os.path.dirname(r["folder"])))
        export_half(r["folder"], target, {"selection": {"dev": args.dev, **r, "candidates": len(results)}},
                    args.delta_from)
        print(f"exported {r['folder']} -> {target}: WER {r['wer']:.2%} CER {r['cer']:.2%}")


if __name__ == "__main__":
    main()
