"""Which frozen Whisper encoder (and which output units) to build on: a cheap comparison on the CPU.

The shipped recipe freezes Whisper's encoder and trains two new Conformer blocks on top. Whether a bigger frozen
encoder (Whisper base against tiny.en) or subword units (sentencepiece BPE against characters) would help can be
measured without running that recipe: compute the frozen encoder's output once for every utterance (``cache``),
then train only the new blocks and a CTC head on those cached features (``train``), a few times faster per
epoch than ``edge-asr train``, which runs the frozen encoder in every step. The numbers are for comparing
encoders and units under one budget, not a model to ship: the cache holds speed 1.0 only (no speed
perturbation), and SpecAugment cannot reach the input, so time masks are applied to the cached features.

    python experiments/probe_frozen.py cache --whisper whisper-base --data ../shared/data/librispeech-mini/train-clean-5 \\
        --out runs/probe/base_train.pt
    python experiments/probe_frozen.py cache --whisper whisper-base --data ../shared/data/librispeech-mini/dev-clean-2-a \\
        --limit 200 --out runs/probe/base_dev.pt
    python experiments/probe_frozen.py train --train runs/probe/base_train.pt --dev runs/probe/base_dev.pt \\
        --blocks 2 --epochs 3 --lr 1e-3 [--bpe 256]

``cache`` stores, per utterance, Whisper's encoder output after its final LayerNorm (``ln_post``), fp16, (T', D).
``train`` prints greedy WER/CER on the first 100 dev utterances of the cache and on the next 100. Several
``--train`` caches are trained on together (say the shared data and ``experiments/synthesize_speech.py``'s speech);
``--steps`` fixes the number of steps, so that runs on more data get the same compute, not more.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import jiwer
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr_core.audio import load_audio  # noqa: E402
from asr_core.config import preset  # noqa: E402
from asr_core.data import load_utterances  # noqa: E402
from asr_core.decoding import greedy_ids  # noqa: E402
from asr_core.features import log_mel  # noqa: E402
from asr_core.model import ConformerBlock, valid_mask  # noqa: E402
from asr_core.text import CharTokenizer, normalize_text  # noqa: E402
from asr_core.whisper_init import resolve_whisper_source, whisper_encoder_model, whisper_preset  # noqa: E402


def cmd_cache(args) -> None:
    torch.set_num_threads(args.threads)
    encoder = whisper_encoder_model(resolve_whisper_source(args.whisper))
    cfg, width = encoder.cfg, encoder.cfg.d_model
    utts = load_utterances(args.data, limit=args.limit or None)
    feats, start, seconds = [], time.time(), 0.0
    with torch.inference_mode():
        for i, u in enumerate(utts):
            samples = load_audio(u.audio_path, allow_silence=True)
            seconds += len(samples) / 16000
            mel = log_mel(samples, cfg.features)[None]
            out, _ = encoder.encode(mel, torch.tensor([mel.shape[1]]))  # (1, T', D), after ln_post
            feats.append(out[0].half())
            if i % 200 == 0:
                print(f"{i}/{len(utts)}  {seconds / (time.time() - start):.0f} audio-s/s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"whisper": args.whisper, "width": width, "feats": feats, "texts": [u.text for u in utts]}, args.out)
    print(f"{len(feats)} utterances, {seconds:.0f} s of audio in {time.time() - start:.0f} s -> {args.out}")


class BPETokenizer:
    """sentencepiece BPE pieces with the CTC blank at 0 (piece i is id i + 1)."""

    blank_id = 0

    def __init__(self, texts: list[str], size: int, workdir: Path):
        import sentencepiece as spm  # only this comparison needs it

        corpus = workdir / "bpe_corpus.txt"
        corpus.write_text("\n".join(normalize_text(t) for t in texts))
        prefix = workdir / f"bpe{size}"
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=size,
                                       model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0,
                                       minloglevel=2)
        self.sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
        self.size = size

    def __len__(self) -> int:
        return self.size + 1

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.sp.encode(normalize_text(text))]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i - 1 for i in ids if i != 0])


class Top(nn.Module):
    """``blocks`` new Conformer blocks (started closed, as ``train --layers`` starts them) + LayerNorm + CTC head
    on cached encoder output; with no blocks, a linear head alone (a linear probe)."""

    def __init__(self, width: int, blocks: int, vocab: int):
        super().__init__()
        cfg = preset(whisper_preset(width))
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(blocks))
        for block in self.blocks:
            for linear in (block.ffn1.linear2, block.attn.out_proj, block.conv.pointwise2, block.ffn2.linear2):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        self.norm = nn.LayerNorm(width) if blocks else nn.Identity()
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, T', D), lengths (B,) -> log-probs (B, T', V)."""
        mask = valid_mask(lengths, x.shape[1])
        for block in self.blocks:
            x = block(x, mask)
        return F.log_softmax(self.head(self.norm(x)).float(), dim=-1)


def pad(items: list[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([x.shape[0] for x in items])
    out = torch.zeros(len(items), int(lengths.max()), width)
    for j, x in enumerate(items):
        out[j, : x.shape[0]] = x.float()
    return out, lengths


def cmd_train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    caches, dev = [torch.load(path) for path in args.train], torch.load(args.dev)
    if any(cache["width"] != dev["width"] for cache in caches):
        raise SystemExit("--train and --dev were cached from different encoders")
    width = dev["width"]
    train = {"feats": [f for c in caches for f in c["feats"]], "texts": [t for c in caches for t in c["texts"]]}
    tokenizer = BPETokenizer(train["texts"], args.bpe, Path(args.train[0]).parent) if args.bpe else CharTokenizer()
    top = Top(width, args.blocks, len(tokenizer))
    feats, targets = train["feats"], [torch.tensor(tokenizer.encode(t)) for t in train["texts"]]
    order = sorted(range(len(feats)), key=lambda i: feats[i].shape[0])
    batches, current = [], []
    for i in order:  # length-sorted batches of at most --batch-frames padded frames
        if current and (len(current) + 1) * feats[i].shape[0] > args.batch_frames:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    steps = args.steps or max(1, int(args.epochs * len(batches)))
    warmup = max(1, steps // 20)
    opt = torch.optim.AdamW(top.parameters(), lr=args.lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    start, step = time.time(), 0
    while step < steps:
        rng.shuffle(batches)
        for batch in batches[: steps - step]:
            x, lengths = pad([feats[i] for i in batch], width)
            for j in range(len(batch)):  # time masks on the cached features (SpecAugment cannot reach the input)
                for _ in range(args.time_masks):
                    span = rng.randint(0, min(20, int(lengths[j]) // 10 + 1))
                    at = rng.randint(0, max(0, int(lengths[j]) - span))
                    x[j, at:at + span] = 0
            with torch.autocast("cpu", dtype=torch.bfloat16):
                log_probs = top(x, lengths)
            ys = [targets[i] for i in batch]
            loss = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(ys), lengths, torch.tensor([len(y) for y in ys]),
                              blank=0, zero_infinity=True)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(top.parameters(), 5.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"step {step}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f} s", flush=True)

    def score(lo: int, hi: int) -> str:
        top.eval()
        with torch.no_grad():
            hyps = [tokenizer.decode(greedy_ids(top(*pad([f], width))[0])) for f in dev["feats"][lo:hi]]
        refs = [normalize_text(t) for t in dev["texts"][lo:hi]]
        return f"WER {100 * jiwer.wer(refs, hyps):.2f}%  CER {100 * jiwer.cer(refs, hyps):.2f}%"

    print(f"dev 1-100: {score(0, 100)} | dev 101-200: {score(100, 200)} | {time.time() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cache", help="frozen Whisper encoder output of every utterance -> a .pt file")
    p.add_argument("--whisper", required=True, help="whisper-tiny.en, whisper-base, or a CTranslate2 folder")
    p.add_argument("--data", required=True, help="LibriSpeech folder or JSONL manifest")
    p.add_argument("--limit", type=int, default=0, help="first N utterances only")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("train", help="train new blocks + CTC head on cached features; print dev greedy WER")
    p.add_argument("--train", required=True, nargs="+", help="one or more caches, trained on together")
    p.add_argument("--dev", required=True, help="a cache of at least 200 dev utterances")
    p.add_argument("--blocks", type=int, default=2, help="new Conformer blocks (0: a linear head alone)")
    p.add_argument("--bpe", type=int, default=0, help="sentencepiece BPE pieces instead of characters")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead (equal compute across data)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-frames", type=int, default=10000, help="padded encoder frames per batch (200 s)")
    p.add_argument("--time-masks", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cmd_cache(args) if args.command == "cache" else cmd_train(args)


if __name__ == "__main__":
    main()
