"""``edge-asr compress | benchmark | export | sensitivity | inspect``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _model_flag(p):
    p.add_argument("--model", default=None, help="trained checkpoint folder (default: the shipped baseline)")


def add_calibration_flags(p):
    p.add_argument("--calib", default=None,
                   help="calibration audio for the calibrated algorithms: a folder of any audio, a LibriSpeech folder "
                        "or a manifest; no transcripts needed (default: the set bundled in assets/calibration/)")
    p.add_argument("--calib-utterances", type=int, default=None,
                   help="how many calibration utterances to use (default 32; at least 4)")


def calibration_stats(args, model, recipes):
    """The model's calibration statistics when any recipe asks for a calibrated algorithm, else None."""
    from .calibration import stats_for
    from .methods import is_calibrated

    if not any(is_calibrated(s) for r in recipes for _, s in r.steps):
        return None
    stats = stats_for(model, args.calib, args.calib_utterances)
    print(f"calibration: {stats.describe()}", flush=True)
    return stats


def add_subcommands(sub) -> None:
    p = sub.add_parser("compress", help="compress a model with a recipe into an artifact folder",
                       description="RECIPE: inline (int8, int4:group=64, ternary, prune:sparsity=0.5, "
                                   "structured:fraction=0.3, svd:energy=0.9 or svd:rank=64, kmeans:clusters=16; "
                                   "chain with +) or a JSON recipe file.")
    _model_flag(p)
    p.add_argument("--recipe", required=True, help="inline recipe or JSON recipe file")
    p.add_argument("--out", required=True, help="artifact folder to write")
    add_calibration_flags(p)
    p.add_argument("--sequential", action="store_true",
                   help="GPTQ's true-sequential mode: calibrate every block on the outputs of the blocks before it, "
                        "already compressed, and every step of a chain on the steps before it (slower; default: "
                        "statistics of the uncompressed model, re-collected only after steps that reshape layers)")
    p.add_argument("--distill", action="store_true",
                   help="fine-tune against the uncompressed model's frame posteriors (KL); any audio works, "
                        "transcripts not needed (default data: the calibration audio)")
    p.add_argument("--ctc-weight", type=float, default=None,
                   help="with --distill: add CTC on the transcripts of --data with this weight (default 0)")
    p.add_argument("--distill-hidden", type=float, default=0.0,
                   help="with --distill: add layer matching, every block's output against the uncompressed "
                        "model's (relative squared error), with this weight (default 0: off)")
    p.add_argument("--skip", default=None,
                   help="comma-separated layer-name patterns kept in fp16 (default: subsampling.conv1,head)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="recovery fine-tuning steps (needs --data, or --distill)")
    p.add_argument("--finetune-minutes", type=float, default=None, help="or a time budget for fine-tuning")
    p.add_argument("--finetune-dropout", type=float, default=None,
                   help="the model's dropout while it is fine-tuned (default: 0 with --distill, where the student "
                        "learns the teacher's dropout-free function; the model's own for CTC)")
    p.add_argument("--finetune-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="speed perturbation and SpecAugment while fine-tuning (default: off with --distill, where "
                        "matching the teacher on masked features made the student worse; on for CTC)")
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
    p.add_argument("--runtime", choices=("torch", "onnx", "both"), default="torch",
                   help="run every variant in PyTorch, on ONNX Runtime (exported with `edge-asr export`), or both "
                        "(one row each, in one run)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the RAM column (each row's peak resident memory, measured in a fresh process)")
    p.add_argument("--peers", action="store_true",
                   help="add Whisper tiny.en and pocketsphinx as reference rows, measured on the same utterances "
                        "(the `peers` extra; a missing one is noted and left out)")
    add_calibration_flags(p)
    p.set_defaults(handler=cmd_benchmark)

    p = sub.add_parser("export", help="any model folder (checkpoint or artifact) to an ONNX model folder for ONNX "
                                      "Runtime and the torch-free runner (python -m asr_core.lite)")
    _model_flag(p)
    p.add_argument("--out", required=True, help="ONNX model folder to write (model.onnx, config.json, vocab.json, "
                                                "and the LM when the source has one)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="ONNX Runtime's own quantizer on an FP32 checkpoint (an artifact keeps its own codes)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 18-22)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=0,
                   help="MatMulNBits compute type for int4 (0: fp32, as the torch artifact; 4: int8, faster)")
    p.add_argument("--int8-weights", choices=("auto", "s8", "u8"), default="auto",
                   help="int8 weights as int8 (s8: fast and exact on CPUs with VNNI and on ARM) or uint8 with zero "
                        "point 128 (u8: exact on x86 CPUs without VNNI, where ONNX Runtime's s8 kernel saturates); "
                        "auto: s8 unless this CPU is x86 without VNNI. Choose for the CPU the model will run on")
    p.add_argument("--activations", choices=("auto", "per-tensor", "per-row"), default="auto",
                   help="how int8 layers round their inputs at run time: one scale per utterance (per-tensor, ONNX "
                        "Runtime's dynamic quantizer: fastest) or one per frame (per-row: closer to FP32, slower); "
                        "auto: as the artifact's own int8 layers (per-row for int8:algo=gptq), else per-tensor")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("sensitivity", help="WER change when one layer (type) at a time is compressed")
    _model_flag(p)
    p.add_argument("--data", required=True, help="dev data (a small subset is enough: see --limit)")
    p.add_argument("--method", required=True, help="one inline method, e.g. int4:group=64 or prune:sparsity=0.7")
    p.add_argument("--by", choices=("type", "layer"), default="type", help="group layers by type or one by one")
    p.add_argument("--limit", type=int, default=50, help="first N utterances (default 50)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write rows as JSON here")
    add_calibration_flags(p)
    p.set_defaults(handler=cmd_sensitivity)
    _add_inspect(sub)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what a compressed artifact did to its model: the studio's class-view "
                                       "figures (HTML) and their numbers (JSON)")
    p.add_argument("--model", required=True, help="compressed artifact folder (written by `edge-asr compress`)")
    p.add_argument("--base", default=None, help="the model it was compressed from (default: the folder its "
                                                "compression.json names, else the shipped baseline)")
    p.add_argument("--layer", default=None, help="layer for the histogram, spectrum and storage (default: the most "
                                                 "damaged on the clip)")
    p.add_argument("--clip", default=None, help="audio for the per-layer output errors and the frame view (default: "
                                                "the bundled 10.9 s clip; the first 30 s of a longer one)")
    p.add_argument("--out", required=True, help="folder to write inspect.json, how_it_works.md and the figures to")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(handler=cmd_inspect)


def _check_compress_args(args) -> bool:
    """Validate before any work; whether recovery fine-tuning was asked for."""
    from asr_core.errors import SettingsError

    tuning = bool(args.finetune_steps or args.finetune_minutes)
    if tuning and not (args.data or args.distill):
        raise SettingsError("--finetune-steps/--finetune-minutes need --data (or --distill, which can use any audio)")
    if args.finetune_steps < 0:
        raise SettingsError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.distill_hidden and not args.distill:
        raise SettingsError("--distill-hidden (layer matching) needs --distill")
    if args.distill_hidden < 0:
        raise SettingsError(f"--distill-hidden must be >= 0, got {args.distill_hidden}")
    return tuning


def cmd_compress(args) -> int:
    from asr_core.checkpoint import default_model_dir, is_artifact, load_model, read_config
    from asr_core.errors import SettingsError
    from asr_core.provenance import Provenance, current_command, parent

    from .artifact import save_artifact
    from .compress import apply_recipe, format_report, layer_report
    from .recipe import parse_recipe

    recipe = parse_recipe(args.recipe, _skip_patterns(args.skip))  # validated before any work
    tuning = _check_compress_args(args)
    model_dir = args.model or default_model_dir()
    if is_artifact(model_dir):
        raise SettingsError(f"{model_dir} is already a compressed artifact; compress the trained checkpoint")
    base, tokenizer = load_model(model_dir)
    start = time.perf_counter()
    stats = calibration_stats(args, base, [recipe])
    calib_seconds = time.perf_counter() - start
    compressed = apply_recipe(base, recipe, progress=True, stats=stats, sequential=args.sequential)
    info = {"compress_seconds": round(time.perf_counter() - start - calib_seconds, 2),
            "source_model": os.path.abspath(model_dir)}
    if stats is not None:
        info["calibration"] = {"source": stats.calibration.source, "utterances": len(stats.calibration),
                               "seconds": round(calib_seconds, 2)}
    if tuning:
        info["finetune"] = _finetune(args, base, compressed, tokenizer, model_dir)
    print(format_report(layer_report(base, compressed)))
    record = Provenance("compress", current_command(), [parent(model_dir, read_config(model_dir))], {},
                        {"recipe": recipe.describe(), **info})
    save_artifact(compressed, args.out, tokenizer, recipe.to_json(), extra=info, provenance=record)
    _print_sizes(recipe, base, model_dir, args.out, calib_seconds, info["compress_seconds"])
    return 0


def _skip_patterns(text: str | None):
    return tuple(s.strip() for s in text.split(",")) if text is not None else None


def _print_sizes(recipe, base, model_dir: str, out: str, calib_seconds: float, compress_seconds: float) -> None:
    from asr_core.checkpoint import folder_bytes

    before, after = folder_bytes(model_dir), folder_bytes(out)
    base_fp32 = 4 * sum(p.numel() for p in base.parameters())
    print(f"\n{recipe.describe()}: {after / 1e6:.2f} MB on disk; {base_fp32 / after:.2f}x smaller than fp32 "
          f"({base_fp32 / 1e6:.2f} MB), {before / after:.2f}x smaller than {model_dir} ({before / 1e6:.2f} MB); "
          f"calibration {calib_seconds:.1f} s, compression {compress_seconds} s -> {out}")


def _finetune(args, base, compressed, tokenizer, model_dir) -> dict:
    """Recovery fine-tuning of ``compressed`` (CTC on --data, or distillation from ``base``); its summary."""
    from asr_core.data import load_utterances, read_audio_files

    from .calibration import BUNDLED
    from .compress import finetune, trained_freeze_layers

    source = args.data or args.calib or str(BUNDLED)
    train_utts = read_audio_files(source) if args.distill else load_utterances(source)
    dev_utts = load_utterances(args.dev, 100) if args.dev else []
    # distilling every block of the shipped model made it worse (docs/RESULTS.md): as trained, unless asked
    frozen = trained_freeze_layers(model_dir) if args.freeze_layers is None else args.freeze_layers
    summary = finetune(compressed, tokenizer, train_utts, dev_utts, steps=args.finetune_steps or None,
                       minutes=args.finetune_minutes, lr=args.lr, batch_seconds=args.batch_seconds,
                       freeze_layers=frozen, teacher=base if args.distill else None, distill=args.distill,
                       ctc_weight=args.ctc_weight, dropout=args.finetune_dropout,
                       augment=args.finetune_augment, hidden_weight=args.distill_hidden)
    return {"steps": summary["step"], "minutes": round(summary["train_seconds"] / 60, 2), "data": source,
            "lr": args.lr, "freeze_layers": frozen, "distill": bool(args.distill),
            "dropout": summary["dropout"], "augment": summary["augment"], "hidden_weight": args.distill_hidden,
            **({"dev_wer": summary["dev_last"]["wer"]} if summary.get("dev_last") else {})}


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
    table = run_benchmark(args.model or default_model_dir(), utterances, recipes, args.out,
                          decoding=args.decoding, peers=args.peers, memory=not args.no_memory,
                          runtimes=("torch", "onnx") if args.runtime == "both" else (args.runtime,),
                          calib=args.calib, calib_utterances=args.calib_utterances)
    print(markdown_table(table))
    print(f"\n{len(utterances)} utterances, {args.threads} threads, {args.decoding} decoding -> "
          f"{args.out}/results.md, results.csv, results.json, charts.html")
    return 0


def cmd_export(args) -> int:
    from asr_core.checkpoint import default_model_dir

    from .export import export_onnx

    result = export_onnx(args.model or default_model_dir(), args.out, quantize=args.quantize, opset=args.opset,
                         accuracy_level=args.accuracy_level, int8_weights=args.int8_weights,
                         activations=args.activations)
    print(json.dumps(result, indent=2))
    weights = f", int8 weights {result['int8_weights']}" if "int8_weights" in result else ""
    print(f"exported in {result['seconds']:.1f} s: model.onnx {result['bytes'] / 1e6:.1f} MB{weights} -> {args.out}",
          file=sys.stderr)
    return 0


def cmd_sensitivity(args) -> int:
    from asr_core.checkpoint import load_model
    from asr_core.data import load_utterances

    from .recipe import parse_recipe
    from .sensitivity import sensitivity

    from asr_core.errors import SettingsError

    recipe = parse_recipe(args.method)
    if len(recipe.steps) != 1:  # before the model loads and calibration runs
        raise SettingsError("sensitivity takes one method, e.g. 'int4:group=64' or 'prune:sparsity=0.7', "
                            f"not the chain {args.method!r}")
    utterances = load_utterances(args.data, args.limit)
    model, tokenizer = load_model(args.model)
    stats = calibration_stats(args, model, [recipe])
    rows = sensitivity(model, tokenizer, utterances, args.method, by=args.by,
                       stats=stats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def cmd_inspect(args) -> int:
    from asr_core.audio import load_audio
    from asr_core.checkpoint import default_model_dir, is_artifact, load_model
    from asr_core.errors import SettingsError

    from .inspect import DEFAULT_CLIP, clip_features, explain, inspect_variant, source_model
    from .inspect_figures import figures

    if not is_artifact(args.model):
        raise SettingsError(f"{args.model} is not a compressed artifact folder (no compression.json)", setting="model")
    base, tokenizer = load_model(args.base or source_model(args.model) or default_model_dir())
    model, _ = load_model(args.model)
    samples = load_audio(args.clip or str(DEFAULT_CLIP))
    report = inspect_variant(base, model, args.model, tokenizer, clip_features(samples, base), args.layer)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "inspect.json"), "w") as f:
        json.dump(report, f)
    with open(os.path.join(args.out, "how_it_works.md"), "w") as f:
        f.write(explain(report) + "\n")
    written = _write_figures(figures(report), args.out)
    print(f"{report['layer']}: {len(report['layers'])} layers, {len(written)} figures -> {args.out}/ "
          f"({', '.join(written)}, inspect.json, how_it_works.md)")
    return 0


def _write_figures(figs: dict, out: str) -> list[str]:
    """Each figure as an HTML file (plotly.min.js written once beside them, so the folder opens offline), and as
    PNG when kaleido is importable and can start its Chrome (else one line says why)."""
    try:
        import kaleido  # noqa: F401
        png = True
    except ImportError:
        png = False
        print("PNG figures skipped: kaleido is not installed (pip install kaleido); the HTML figures are complete")
    written = []
    for stem, fig in figs.items():
        fig.write_html(os.path.join(out, f"{stem}.html"), include_plotlyjs="directory")
        written.append(f"{stem}.html")
        if png:
            png = _write_png(fig, os.path.join(out, f"{stem}.png"))
            written += [f"{stem}.png"] if png else []
    return written


def _write_png(fig, path: str) -> bool:
    """Whether ``fig`` was written as PNG; kaleido renders in a headless Chrome (or Chromium), which may be
    missing or fail to start: then one line says so, and the HTML figures stand."""
    try:
        fig.write_image(path, width=1200, scale=1)
        return True
    except Exception as err:  # noqa: BLE001 - kaleido and choreographer raise their own types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"PNG figures skipped: kaleido could not render ({first[:200]}); install Chrome or Chromium, or "
              f"run `plotly_get_chrome`; the HTML figures are complete")
        return False
