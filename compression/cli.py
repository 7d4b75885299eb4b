"""``edge-asr compress | benchmark | sensitivity``."""
from __future__ import annotations

import json
import os
import time


def _model_flag(p):
    p.add_argument("--model", default=None, help="trained checkpoint folder (default: the shipped baseline)")


def add_subcommands(sub) -> None:
    p = sub.add_parser("compress", help="compress a model with a recipe into an artifact folder",
                       description="RECIPE: inline (int8, int4:group=64, ternary, prune:sparsity=0.5, "
                                   "structured:fraction=0.3, svd:energy=0.9 or svd:rank=64, kmeans:clusters=16; "
                                   "chain with +) or a JSON recipe file.")
    _model_flag(p)
    p.add_argument("--recipe", required=True, help="inline recipe or JSON recipe file")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--skip", default=None,
                   help="comma-separated layer-name patterns kept in fp16 (default: subsampling.conv1,head)")
    p.add_argument("--finetune-steps", type=int, default=0, help="recovery fine-tuning steps (needs --data)")
    p.add_argument("--finetune-minutes", type=float, default=None, help="or a time budget for fine-tuning")
    p.add_argument("--freeze-layers", type=int, default=None,
                   help="keep the stem and the first K blocks fixed while fine-tuning (default: as the model was "
                        "trained, from its config.json; the shipped baseline: 4)")
    p.add_argument("--data", default=None, help="fine-tuning data: LibriSpeech folder or JSONL manifest")
    p.add_argument("--dev", default=None, help="optional dev data: WER printed after fine-tuning")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning peak learning rate (default 1e-4)")
    p.add_argument("--batch-seconds", type=float, default=90.0, help="padded audio seconds per batch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(handler=cmd_compress)

    p = sub.add_parser("benchmark", help="baseline + compressed variants on a dev set -> table and charts")
    _model_flag(p)
    p.add_argument("--data", required=True, help="dev data: LibriSpeech folder or JSONL manifest")
    p.add_argument("--recipes", nargs="*", default=None,
                   help="inline recipes, recipe files or existing artifact folders (default: the standard set)")
    p.add_argument("--out", required=True, help="output folder (results.{md,csv,json}, charts.html, artifacts/)")
    p.add_argument("--limit", type=int, default=None, help="first N utterances only")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for every variant (default 2)")
    p.add_argument("--decoding", choices=("greedy", "lm"), default="greedy",
                   help="greedy (default: the models alone) or lm (every variant with the baseline's word LM)")
    p.set_defaults(handler=cmd_benchmark)

    p = sub.add_parser("sensitivity", help="WER change when one layer (type) at a time is compressed")
    _model_flag(p)
    p.add_argument("--data", required=True, help="dev data (a small subset is enough: see --limit)")
    p.add_argument("--method", required=True, help="one inline method, e.g. int4:group=64 or prune:sparsity=0.7")
    p.add_argument("--by", choices=("type", "layer"), default="type", help="group layers by type or one by one")
    p.add_argument("--limit", type=int, default=50, help="first N utterances (default 50)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write rows as JSON here")
    p.set_defaults(handler=cmd_sensitivity)


def cmd_compress(args) -> int:
    import torch

    from asr_core.checkpoint import MANIFEST, default_model_dir, folder_bytes, load_model, read_config
    from asr_core.data import load_utterances
    from asr_core.errors import SettingsError

    from .artifact import save_artifact
    from .compress import apply_recipe, finetune, format_report, layer_report
    from .recipe import parse_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    skip = tuple(s.strip() for s in args.skip.split(",")) if args.skip is not None else None
    recipe = parse_recipe(args.recipe, skip)  # validated before any work
    if (args.finetune_steps or args.finetune_minutes) and not args.data:
        raise SettingsError("--finetune-steps/--finetune-minutes need --data")
    if args.finetune_steps < 0:
        raise SettingsError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    model_dir = args.model or default_model_dir()
    if os.path.exists(os.path.join(model_dir, MANIFEST)):
        raise SettingsError(f"{model_dir} is already a compressed artifact; compress the trained checkpoint")
    base, tokenizer = load_model(model_dir)
    start = time.perf_counter()
    compressed = apply_recipe(base, recipe, progress=True)
    info = {"compress_seconds": round(time.perf_counter() - start, 2), "source_model": os.path.abspath(model_dir)}
    if args.finetune_steps or args.finetune_minutes:
        train_utts = load_utterances(args.data)
        dev_utts = load_utterances(args.dev, 100) if args.dev else []
        frozen = args.freeze_layers
        if frozen is None:  # as the model was trained (train records it)
            frozen = int(read_config(model_dir).get("training", {}).get("freeze_layers", 0))
        summary = finetune(compressed, tokenizer, train_utts, dev_utts, steps=args.finetune_steps or None,
                           minutes=args.finetune_minutes, lr=args.lr, batch_seconds=args.batch_seconds,
                           freeze_layers=frozen)
        info["finetune"] = {"steps": summary["step"], "minutes": round(summary["train_seconds"] / 60, 2),
                            "data": args.data, "lr": args.lr, "freeze_layers": frozen,
                            **({"dev_wer": summary["dev_last"]["wer"]} if summary.get("dev_last") else {})}
    print(format_report(layer_report(base, compressed)))
    save_artifact(compressed, args.out, tokenizer, recipe.to_json(), extra=info)
    before, after = folder_bytes(model_dir), folder_bytes(args.out)
    base_fp32 = 4 * sum(p.numel() for p in base.parameters())
    print(f"\n{recipe.describe()}: {after / 1e6:.2f} MB on disk; {base_fp32 / after:.2f}x smaller than fp32 "
          f"({base_fp32 / 1e6:.2f} MB), {before / after:.2f}x smaller than {model_dir} ({before / 1e6:.2f} MB); "
          f"compressed in {info['compress_seconds']} s -> {args.out}")
    return 0


def cmd_benchmark(args) -> int:
    from asr_core.checkpoint import default_model_dir
    from asr_core.data import load_utterances

    from .benchmark import DEFAULT_RECIPES, markdown_table, run_benchmark
    from .recipe import parse_recipe

    recipes = args.recipes or DEFAULT_RECIPES
    for r in recipes:  # fail before any work
        if not os.path.isdir(r):
            parse_recipe(r)
    utterances = load_utterances(args.data, args.limit)
    table = run_benchmark(args.model or default_model_dir(), utterances, recipes, args.out, threads=args.threads,
                          decoding=args.decoding)
    print(markdown_table(table))
    print(f"\n{len(utterances)} utterances, {args.threads} threads, {args.decoding} decoding -> "
          f"{args.out}/results.md, results.csv, results.json, charts.html")
    return 0


def cmd_sensitivity(args) -> int:
    from asr_core.checkpoint import load_model
    from asr_core.data import load_utterances

    from .sensitivity import sensitivity

    model, tokenizer = load_model(args.model)
    rows = sensitivity(model, tokenizer, load_utterances(args.data, args.limit), args.method, by=args.by,
                       threads=args.threads)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
