"""The one training loop: CTC in fp32, AdamW, warmup + cosine decay, clipping, validation WER, best/last/
averaged checkpoints, and resume after interruption with nothing lost.

Started by torchrun it trains data-parallel (DistributedDataParallel: gloo on CPU, NCCL on CUDA): each rank
takes its own batches (:class:`~asr_core.data.RankBatchSampler`), gradients are averaged by DDP, validation
is sharded and gathered, and only rank 0 prints and writes. ``accumulate`` micro-batches per step give one
small device the same effective batch.

Compression's recovery fine-tuning calls :func:`train` too: its constraints (pruning masks, shared cluster
values, quantisation grids) are parametrizations of the weights, so the loop needs no special case.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .augment import spec_augment
from .checkpoint import read_state, save_model
from .data import BucketBatchSampler, RankBatchSampler, SpeechDataset, Utterance, collate
from .decoding import GreedyDecoder
from .distributed import (DEFAULT_TIMEOUT_S, World, agree, broadcast_object, gather_objects, joined_world,
                          launched_world, rank_device, shard_bounds, sum_values)
from .errors import SettingsError
from .evaluation import decode_batches, error_rates
from .model import ConformerCTC, valid_mask
from .provenance import Provenance, current_command
from .text import CharTokenizer

STATE_FILE = "train_state.pt"  # optimizer + progress; written by us, read with weights_only=True


@dataclass
class TrainConfig:
    lr: float = 1e-3
    head_lr: float | None = None  # None: same as lr. A fresh CTC head on a pretrained encoder wants more.
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    final_lr_ratio: float = 0.05  # cosine decays to lr * this at the last step
    max_steps: int | None = None
    epochs: float | None = None
    max_minutes: float | None = None
    batch_seconds: float = 120.0  # padded audio seconds per batch, per rank
    accumulate: int = 1  # micro-batches per optimizer step: effective batch = world size x accumulate x batch
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds a rank waits for the others before giving up
    # decoded audio is cached in memory (int16) only for a training set up to this long: 5 h is 0.6 GB per
    # process, 960 h would be 110 GB, so large corpora are read from their files each time (use --workers)
    audio_cache_hours: float = 20.0
    grad_clip: float = 5.0
    seed: int = 0
    workers: int = 0
    speed_factors: tuple[float, ...] = (0.9, 1.0, 1.1)
    spec_augment: bool = True
    freq_masks: int = 2
    time_masks: int = 10
    freeze_encoder_steps: int = 0  # train only the CTC head first: a random head's gradients would wreck a
    # pretrained encoder, and a frozen encoder runs forward-only (about 3x faster per step)
    # keep the conv stem and the first K blocks as they start, for the whole run: on 28 training speakers a
    # fine-tuned encoder forgets what made the pretrained one speaker-robust; new blocks above it learn the task.
    # Frozen blocks run forward-only and without dropout.
    freeze_layers: int = 0
    # learning rates per part: the conv stem and the first K blocks (the pretrained ones) learn at lr * scale.
    # A middle way between freezing them and fine-tuning them at the rate the new blocks need.
    slow_layers: int = 0
    slow_lr_scale: float = 1.0
    eval_every: int = 500  # steps; also when snapshots for averaging are taken
    dev_limit: int | None = 200
    average_last: int = 3
    save_every: int = 100  # steps between resumable saves
    half_checkpoints: bool = False
    device: str = "auto"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16": autocast on either; "fp32"
    log_every: int = 10
    # distillation from a teacher passed to train(): loss = ctc_weight * CTC + distill_weight * KL(teacher || student)
    distill_weight: float = 0.0
    ctc_weight: float = 1.0  # 0: no CTC at all, so the data needs no transcripts
    distill_temperature: float = 1.0
    # + this x the normalised squared error between every block's output and the teacher's (layer matching as in
    # TinyBERT and DistilHuBERT: a signal at every block rather than at the posteriors only); 0: off
    distill_hidden_weight: float = 0.0
    extra: dict = field(default_factory=dict)  # recorded in config.json (e.g. how the model was initialised)


def lr_at(step: int, total: int | None, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Multiplier of the peak rate: linear warmup, then cosine to ``final_lr_ratio``.

    The cosine runs over steps when the run has a step count (``--max-steps``/``--epochs``); a run bounded only
    by ``--max-minutes`` runs it over wall-clock time instead (``time_fraction`` of the budget spent), so that
    "train for 6 minutes" ends annealed on any hardware. With neither, inverse square root.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if total is None and time_fraction is None:
        return math.sqrt(cfg.warmup_steps / (step + 1))
    if total is None:
        progress = min(1.0, time_fraction)
    else:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def ctc_loss(log_probs: torch.Tensor, out_lengths: torch.Tensor, targets: torch.Tensor,
             target_lengths: torch.Tensor, blank: int = 0) -> torch.Tensor:
    """Mean over utterances of CTC loss divided by target length (fp32; impossible alignments give 0)."""
    return F.ctc_loss(log_probs.float().transpose(0, 1), targets, out_lengths, target_lengths, blank=blank,
                      reduction="mean", zero_infinity=True)


def distill_loss(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, out_lengths: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per frame over the vocabulary, mean over the valid frames, times T^2 (fp32).

    Both log-probs (B, T', V), out_lengths (B,). Each is softened by dividing by ``temperature`` and renormalised
    (Hinton et al. 2015); the T^2 keeps the gradient's size independent of T. Padded frames are dropped before
    anything is computed, so whatever they hold cannot reach the value or the gradient.
    """
    valid = valid_mask(out_lengths, student_log_probs.shape[1])  # (B, T')
    student = F.log_softmax(student_log_probs[valid].float() / temperature, dim=-1)  # (N, V), N valid frames
    teacher = F.log_softmax(teacher_log_probs[valid].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum")
    return kl / max(1, student.shape[0]) * temperature ** 2


def hidden_distill_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                        out_lengths: torch.Tensor) -> torch.Tensor:
    """Mean over blocks of sum ||s - t||^2 / sum ||t||^2 over the valid frames (fp32): each block's output error
    relative to the teacher's, so that the later blocks' larger residual stream does not outweigh the early ones.

    Each list holds one (B, T', D) tensor per block, in order; out_lengths (B,). Padded frames are dropped first.
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise SettingsError(f"layer matching needs the same blocks in student and teacher, got "
                            f"{len(student_hidden)} and {len(teacher_hidden)} block outputs")
    valid = valid_mask(out_lengths, student_hidden[0].shape[1])  # (B, T')
    errors = []
    for s, t in zip(student_hidden, teacher_hidden):
        if s.shape != t.shape:
            raise SettingsError(f"a student block gives {tuple(s.shape)} but the teacher's {tuple(t.shape)}: "
                                "layer matching needs the same model width")
        s, t = s[valid].float(), t[valid].float()  # (N, D)
        errors.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    return torch.stack(errors).mean()


class BlockOutputs:
    """Forward hooks keeping the output (B, T', D) of every block of a ConformerCTC, for layer matching.
    ``take()`` returns what the last forward kept and forgets it; ``remove()`` takes the hooks off again."""

    def __init__(self, model: torch.nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.handles = [block.register_forward_hook(self._keep) for block in getattr(model, "blocks", ())]

    def _keep(self, module, inputs, output) -> None:
        self.outputs.append(output)

    def take(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, []
        return outputs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.outputs = [], []


def _check_distill(cfg: TrainConfig, model: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
    """Refuse contradictory loss settings before any work."""
    if cfg.ctc_weight < 0 or cfg.distill_weight < 0 or cfg.distill_hidden_weight < 0:
        raise SettingsError(f"loss weights must not be negative, got ctc_weight={cfg.ctc_weight}, "
                            f"distill_weight={cfg.distill_weight}, distill_hidden_weight={cfg.distill_hidden_weight}")
    if cfg.distill_hidden_weight > 0:
        if teacher is None:
            raise SettingsError("layer matching (distill_hidden_weight > 0) needs a teacher")
        blocks = len(getattr(model, "blocks", ())), len(getattr(teacher, "blocks", ()))
        if blocks[0] != blocks[1]:
            raise SettingsError(f"layer matching needs as many blocks in the student as in the teacher, got "
                                f"{blocks[0]} and {blocks[1]}")
    if cfg.ctc_weight == 0 and cfg.distill_weight == 0:
        raise SettingsError("ctc_weight and distill_weight are both 0: nothing to train on")
    if (cfg.distill_weight > 0) != (teacher is not None):
        raise SettingsError("distillation needs both a teacher and distill_weight > 0, got "
                            f"{'a' if teacher is not None else 'no'} teacher and distill_weight={cfg.distill_weight}")
    if not cfg.distill_temperature > 0:
        raise SettingsError(f"distill_temperature must be above 0, got {cfg.distill_temperature}")
    # the teacher is frozen below: sharing a parameter with the student would freeze the student too
    if teacher is not None and {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
        raise SettingsError("the teacher shares parameters with the student; pass a separate (uncompressed) copy")


def _loss(cfg: TrainConfig, log_probs: torch.Tensor, out_lengths: torch.Tensor, batch: dict, device: str,
          teacher_log_probs: torch.Tensor | None, hidden: tuple[list, list] | None = None) -> torch.Tensor:
    """ctc_weight * CTC (skipped at weight 0: the data may have no transcripts) + distill_weight * KL
    + distill_hidden_weight * the blocks' relative output error (``hidden``: the student's and the teacher's)."""
    loss = torch.zeros((), device=log_probs.device)
    if cfg.ctc_weight > 0:
        loss = cfg.ctc_weight * ctc_loss(log_probs, out_lengths, batch["targets"].to(device),
                                         batch["target_lengths"].to(device))
    if teacher_log_probs is not None:
        if teacher_log_probs.shape != log_probs.shape:
            raise SettingsError(f"teacher outputs {tuple(teacher_log_probs.shape)} but the student "
                                f"{tuple(log_probs.shape)}: they need the same vocabulary and frame rate")
        loss = loss + cfg.distill_weight * distill_loss(log_probs, teacher_log_probs, out_lengths,
                                                        cfg.distill_temperature)
    if hidden is not None:
        loss = loss + cfg.distill_hidden_weight * hidden_distill_loss(*hidden, out_lengths)
    return loss


def _freeze_teacher(teacher: torch.nn.Module | None, device: str):
    """Put the teacher on ``device``, in eval mode, with no gradients; returns a function that gives back its
    gradient flags and mode: it is usually the base model, which later compressions copy (a frozen copy would
    not train)."""
    if teacher is None:
        return lambda: None
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    was_training = teacher.training
    teacher.to(device).eval().requires_grad_(False)

    def release():
        for p, flag in flags:
            p.requires_grad_(flag)
        teacher.train(was_training)
    return release


def _resolve_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def frozen_modules(model: ConformerCTC, n_blocks: int, name: str = "freeze_layers") -> list[torch.nn.Module]:
    """The conv stem, the dropout after it and the first ``n_blocks`` blocks (none when 0). ``name`` is the
    setting named in the message when ``n_blocks`` is out of range."""
    if not 0 <= n_blocks <= model.cfg.n_layers:
        raise SettingsError(f"{name} must be between 0 and the model's {model.cfg.n_layers} blocks, got {n_blocks}",
                            setting=name)
    if n_blocks == 0:
        return []
    return [model.subsampling, model.dropout, *model.blocks[:n_blocks]]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def average_states(states: list[dict[str, torch.Tensor]],
                   weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts (equal weights by default; ``weights`` should sum to 1). Tensors that are not
    floating point (counters, indices) are taken from the first state."""
    weights = weights or [1.0 / len(states)] * len(states)
    return {k: sum(w * s[k] for w, s in zip(weights, states)) if states[0][k].is_floating_point() else states[0][k]
            for k in states[0]}


@dataclass
class Optimization:
    """What :func:`build_optimizer` sets up: the optimizer, the parameters the encoder warm-up switches off
    (``body``) and the modules frozen for the whole run (kept in eval mode: no dropout where nothing learns)."""

    optimizer: torch.optim.Optimizer
    body: list[torch.nn.Parameter]
    frozen: list[torch.nn.Module]


def build_optimizer(model: ConformerCTC, cfg: TrainConfig) -> Optimization:
    """AdamW with up to three groups: the body at ``lr``, the CTC head at ``head_lr``, the ``slow_layers`` part at
    ``lr * slow_lr_scale``; the ``freeze_layers`` part gets no gradients at all."""
    frozen = frozen_modules(model, cfg.freeze_layers)
    for module in frozen:
        module.requires_grad_(False)
    if not cfg.slow_lr_scale > 0:
        raise SettingsError(f"slow_lr_scale must be above 0 (freeze the layers instead), got {cfg.slow_lr_scale}",
                            setting="slow_lr_scale")
    slow_ids = {id(p) for module in frozen_modules(model, cfg.slow_layers, "slow_layers")
                for p in module.parameters()}
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    groups = [{"params": [p for p in body if id(p) not in slow_ids], "lr": cfg.lr},
              {"params": head, "lr": cfg.head_lr or cfg.lr}]
    slow = [p for p in body if id(p) in slow_ids]
    if slow:
        groups.append({"params": slow, "lr": cfg.lr * cfg.slow_lr_scale})
    for g in groups:
        g["peak_lr"] = g["lr"]
    return Optimization(torch.optim.AdamW(groups, weight_decay=cfg.weight_decay), body, frozen)


@dataclass
class TrainState:
    """Progress that a resumed run continues from (saved in ``train_state.pt``).

    ``batch_in_epoch`` counts global batches (over all ranks and micro-batches), so the position means the
    same on any number of processes; ``audio_seconds`` is summed over ranks."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_wer: float = float("inf")
    audio_seconds: float = 0.0
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    world_size: int = 1  # of the run that wrote this state
    accumulate: int = 1

    def summary(self, reason: str) -> dict:
        return {"reason": reason, "step": self.step, "epoch": self.epoch, "audio_seconds": self.audio_seconds,
                "train_seconds": self.train_seconds,
                "audio_sec_per_sec": self.audio_seconds / max(1e-9, self.train_seconds),
                "data_wait_fraction": self.data_wait_seconds / max(1e-9, self.train_seconds),
                "world_size": self.world_size, "accumulate": self.accumulate}


def make_loaders(model: ConformerCTC, tokenizer: CharTokenizer, train_utts: list[Utterance], cfg: TrainConfig,
                 world: World = World()) -> tuple[RankBatchSampler, DataLoader]:
    """(this rank's batch sampler, its training loader)."""
    hours = sum(u.duration for u in train_utts) / 3600
    cache = hours <= cfg.audio_cache_hours
    dataset = SpeechDataset(train_utts, model.cfg.features, tokenizer, speed_factors=tuple(cfg.speed_factors),
                            cache_audio=cache)
    if cfg.workers > 0 and cache:
        dataset.preload(cfg.workers)  # one shared cache for all workers (see SpeechDataset.preload)
    buckets = BucketBatchSampler([u.duration for u in train_utts], cfg.batch_seconds, shuffle=True, seed=cfg.seed)
    sampler = RankBatchSampler(buckets, world.rank, world.size, cfg.accumulate)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                        persistent_workers=cfg.workers > 0)
    return sampler, loader


def dev_loader(model: ConformerCTC, tokenizer: CharTokenizer, dev_utts: list[Utterance], cfg: TrainConfig,
               world: World = World()) -> DataLoader | None:
    """This rank's contiguous share of the dev utterances (None when it has none)."""
    start, stop = shard_bounds(len(dev_utts), world)
    shard = dev_utts[start:stop]
    if not shard:
        return None
    dev_set = SpeechDataset(shard, model.cfg.features, tokenizer)
    sampler = BucketBatchSampler([u.duration for u in shard], cfg.batch_seconds, shuffle=False)
    return DataLoader(dev_set, batch_sampler=sampler, collate_fn=collate)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int | None:
    """The step count the schedule runs over: the smaller of max_steps and epochs' worth (None: neither)."""
    total = cfg.max_steps
    if cfg.epochs is not None:
        by_epochs = math.ceil(cfg.epochs * steps_per_epoch)
        total = by_epochs if total is None else min(total, by_epochs)
    return total


def data_fingerprint(utterances: list[Utterance]) -> dict:
    """What a saved sampler position depends on: the same utterances in the same order."""
    return {"utterances": len(utterances), "audio_seconds": round(sum(u.duration for u in utterances), 1)}


class Checkpointer:
    """Everything a run writes under ``out_dir`` (nothing when None, or on ranks other than 0): ``last/`` +
    ``train_state.pt`` (resumable), ``best/`` (lowest dev WER), ``snapshots/`` of the last ``average_last``
    validations, ``averaged/`` from them, and ``log.csv``. Each folder's provenance says what it holds and what
    was measured on it. Every rank calls the same methods (saving gathers each rank's random state)."""

    def __init__(self, out_dir: str | None, model: ConformerCTC, tokenizer: CharTokenizer, cfg: TrainConfig,
                 optimizer: torch.optim.Optimizer, world: World = World(), data: dict | None = None):
        self.out_dir, self.model, self.tokenizer, self.cfg, self.optimizer = out_dir, model, tokenizer, cfg, optimizer
        self.world, self.data = world, data or {}
        self.writes = bool(out_dir) and world.is_main
        self.snapshots: list[str] = []
        self._log_file = None
        if self.writes:
            os.makedirs(out_dir, exist_ok=True)

    def _read(self):
        path = os.path.join(self.out_dir or "", STATE_FILE)
        if not self.world.is_main or not self.out_dir or not os.path.exists(path):
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved, read_state(os.path.join(self.out_dir, "last"))

    def resume(self, state: TrainState, device: str) -> bool:
        """Load last/ and train_state.pt (read by rank 0, sent to the others) into the model, optimizer, state and
        random generators; False when there is nothing to resume."""
        payload = broadcast_object(self.world, self._read())
        if payload is None:
            return False
        saved, last = payload
        _check_same_data(saved.get("data"), self.data)
        self.model.load_state_dict({k: v.to(device) for k, v in last.items()})
        self.optimizer.load_state_dict(saved["optimizer"])
        for key, value in saved["progress"].items():
            setattr(state, key, value)
        self.snapshots = list(saved["snapshots"])
        _restore_rng(saved, self.world, self.cfg.seed + state.step)
        return True

    def _provenance(self, state: TrainState, metrics: dict | None = None, **details) -> Provenance:
        cfg = self.cfg
        extra = dict(cfg.extra)
        command = extra.pop("command", "") or current_command()
        parents = extra.pop("parents", [])
        training = {"step": state.step, "epoch": state.epoch,
                    "audio_hours_seen": round(state.audio_seconds / 3600, 3),
                    "train_minutes": round(state.train_seconds / 60, 2),
                    "world_size": self.world.size, "accumulate": cfg.accumulate,
                    "batch_seconds_per_rank": cfg.batch_seconds,
                    "effective_batch_seconds": cfg.batch_seconds * cfg.accumulate * self.world.size,
                    # recovery fine-tuning (compress) must keep these blocks frozen too
                    **({"freeze_layers": cfg.freeze_layers} if cfg.freeze_layers else {}),
                    **({"slow_layers": cfg.slow_layers, "slow_lr_scale": cfg.slow_lr_scale}
                       if cfg.slow_layers and cfg.slow_lr_scale != 1 else {}), **extra, **details}
        return Provenance("train", command, parents, metrics or {}, {"training": training})

    def _save(self, name: str, model: ConformerCTC, provenance: Provenance, half: bool) -> None:
        save_model(os.path.join(self.out_dir, name), model, self.tokenizer, half=half, provenance=provenance)

    def save_resumable(self, state: TrainState) -> None:
        if not self.out_dir:
            return
        rngs = gather_objects(self.world, (random.getstate(), torch.get_rng_state()))
        if not self.writes:
            return
        self._save("last", self.model, self._provenance(state), half=False)
        tmp = os.path.join(self.out_dir, STATE_FILE + ".tmp")
        torch.save({"optimizer": self.optimizer.state_dict(), "progress": dataclasses.asdict(state),
                    "snapshots": self.snapshots, "python_rng": [r[0] for r in rngs],
                    "torch_rng": [r[1] for r in rngs], "data": self.data,
                    "train_config": dataclasses.asdict(self.cfg)}, tmp)
        os.replace(tmp, os.path.join(self.out_dir, STATE_FILE))

    def after_validation(self, state: TrainState, rates: dict, snapshot: bool = True) -> None:
        """Keep a snapshot for averaging; a new best dev WER writes best/ (its dev metrics measured on it)."""
        if rates and rates["wer"] < state.best_wer:
            state.best_wer = rates["wer"]  # on every rank: they agree on what is best
            if self.writes:
                metrics = {"dev": {"wer": rates["wer"], "cer": rates["cer"], "step": state.step,
                                   "utterances": rates.get("utterances")}}
                self._save("best", self.model, self._provenance(state, metrics), half=self.cfg.half_checkpoints)
        if snapshot and self.writes:
            _keep_snapshot(self.model, self.out_dir, state.step, self.snapshots, self.cfg.average_last)

    def save_averaged(self, state: TrainState) -> None:
        if not self.writes or len(self.snapshots) < 2:
            return
        averaged = ConformerCTC(self.model.cfg)
        averaged.load_state_dict(average_states([load_file(p) for p in self.snapshots]))
        names = [os.path.basename(p) for p in self.snapshots]
        self._save("averaged", averaged, self._provenance(state, averaged_snapshots=names),
                   half=self.cfg.half_checkpoints)

    def log(self, state: TrainState, loss: float, lr: float, rates: dict) -> None:
        if not self.writes or not (state.step % self.cfg.log_every == 0 or rates):
            return
        if self._log_file is None:
            path = os.path.join(self.out_dir, "log.csv")
            self._log_file = open(path, "a", newline="")
            if os.path.getsize(path) == 0:
                csv.writer(self._log_file).writerow(["step", "epoch", "loss", "lr", "audio_sec_per_sec",
                                                     "dev_wer", "dev_cer"])
        speed = state.audio_seconds / max(1e-9, state.train_seconds)
        csv.writer(self._log_file).writerow([state.step, state.epoch, f"{loss:.4f}", f"{lr:.3e}", f"{speed:.2f}",
                                             f"{rates.get('wer', '')}", f"{rates.get('cer', '')}"])
        self._log_file.flush()

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _check_same_data(saved: dict | None, now: dict) -> None:
    """A saved position counts batches of one data set: with other data it points nowhere."""
    if saved and now and saved != now:
        raise SettingsError(f"the run in this folder trained on {saved['utterances']} utterances "
                            f"({saved['audio_seconds']:.0f} s) and this one has {now['utterances']} "
                            f"({now['audio_seconds']:.0f} s): its position in the data does not carry over; "
                            f"resume with the same --data (and --limit) or train into a new --out", setting="data")


def _restore_rng(saved: dict, world: World, fresh_seed: int) -> None:
    """Each rank's random state as saved; a run resumed on another number of processes (or from a state saved
    before runs had ranks) cannot have them, so its ranks are seeded afresh from the step."""
    python_rng, torch_rng = saved["python_rng"], saved["torch_rng"]
    if isinstance(python_rng, list) and len(python_rng) == world.size:
        random.setstate(python_rng[world.rank])
        torch.set_rng_state(torch_rng[world.rank])
    elif not isinstance(python_rng, list) and world.size == 1:
        random.setstate(python_rng)
        torch.set_rng_state(torch_rng)
    else:
        random.seed(fresh_seed * 1000 + world.rank)
        torch.manual_seed(fresh_seed * 1000 + world.rank)


class _StopRequested(Exception):
    pass


class StopSignals:
    """Ctrl-C / SIGTERM set a flag the loop checks after each step (so the run stops cleanly and resumes), while
    the ``with`` block lasts; elsewhere the process's handlers stay as they were. A second signal stops at once
    (the handler from before runs), for a step or a final validation that takes too long to wait for."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce  # say so on stderr (rank 0 only: every rank of a torchrun gets the signal)
        self._old: dict = {}

    def __enter__(self):
        if _in_main_thread():
            # a signal the process was told to ignore (e.g. SIGINT in a background job) stays ignored
            self._old = {s: signal.signal(s, self._request) for s in (signal.SIGINT, signal.SIGTERM)
                         if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def _request(self, signum, _frame):
        if self.requested:
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = True
        if self.announce:  # os.write, not print: the signal may land while tqdm is inside a write to stderr
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving; send it again to "
                        f"stop at once\n".encode())

    def _restore(self):
        for s, h in self._old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler installed outside Python
        self._old = {}

    def __exit__(self, *exc):
        self._restore()
        return False


class TrainStep:
    """One optimizer step over ``accumulate`` micro-batches: SpecAugment, the schedule's learning rate, forward
    (bf16 autocast when asked), the loss (CTC and/or distillation), backward (DDP averages the gradients over
    ranks on the last micro-batch), clipping, AdamW. Returns (mean loss, audio seconds of this rank's batches)."""

    def __init__(self, model, teacher, opt: Optimization, cfg: TrainConfig, device: str, total: int | None,
                 world: World = World()):
        self.model, self.teacher, self.opt, self.cfg, self.device, self.total = model, teacher, opt, cfg, device, total
        self.world = world
        self._ddp, self._ddp_phase = None, None
        matching = cfg.distill_hidden_weight > 0 and teacher is not None
        self._taps = (BlockOutputs(model), BlockOutputs(teacher)) if matching else None
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda"))
        # bf16 autocast: ~1.7x faster on CPUs with avx512_bf16 too; the CTC loss itself stays in fp32
        self.autocast = (lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext

    def _module(self, encoder_frozen: bool):
        """The model, or its DDP wrapper for the parameters that learn now. DDP fixes the set of parameters it
        averages when built, so the encoder warm-up (head only) and the rest of the run get a wrapper each."""
        if not self.world.active:
            return self.model
        if self._ddp_phase != encoder_frozen:
            self._ddp = None
            gc.collect()  # the old wrapper's gradient hooks go with it, before the new one adds its own
            ids = [self.world.local_rank] if self.device.startswith("cuda") else None
            # every parameter that requires a gradient gets one (frozen parts require none), so DDP need not walk
            # the graph looking for unused ones
            self._ddp = DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True)
            self._ddp_phase = encoder_frozen
        return self._ddp

    def _backward(self, module, batch: dict, share: float) -> tuple[float, float]:
        cfg, device = self.cfg, self.device
        feats, lengths = batch["features"].to(device, non_blocking=True), batch["lengths"].to(device)
        if cfg.spec_augment:  # on the training device: vectorised, a few kernels per batch
            feats = spec_augment(feats, lengths, freq_masks=cfg.freq_masks, time_masks=cfg.time_masks)
        for taps in self._taps or ():
            taps.take()  # drop what a forward outside this step (validation) kept
        with self.autocast():
            log_probs, out_lengths = module(feats, lengths)
            with torch.no_grad():
                teacher_log_probs = self.teacher(feats, lengths)[0] if self.teacher is not None else None
        hidden = (self._taps[0].take(), self._taps[1].take()) if self._taps else None
        loss = _loss(cfg, log_probs, out_lengths, batch, device, teacher_log_probs, hidden)
        (loss * share).backward()
        features = self.model.cfg.features
        return loss.item(), float(lengths.sum()) * features.hop_length / features.sample_rate

    def close(self) -> None:
        """Take the layer-matching hooks off both models (the teacher is usually the app's base model)."""
        for taps in self._taps or ():
            taps.remove()
        self._taps = None

    def __call__(self, micro_batches: list[dict], step: int, time_fraction: float | None) -> tuple[float, float]:
        encoder_frozen = step < self.cfg.freeze_encoder_steps
        for p in self.opt.body:
            p.requires_grad_(not encoder_frozen)
        module = self._module(encoder_frozen)
        scale = lr_at(step, self.total, self.cfg, time_fraction)
        for g in self.opt.optimizer.param_groups:
            g["lr"] = g["peak_lr"] * scale
        self.opt.optimizer.zero_grad(set_to_none=True)
        losses, seconds = [], 0.0
        for j, batch in enumerate(micro_batches):
            last = j == len(micro_batches) - 1
            with contextlib.nullcontext() if last or module is self.model else module.no_sync():
                loss, s = self._backward(module, batch, 1.0 / len(micro_batches))
            losses.append(loss)
            seconds += s
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.optimizer.step()
        return sum(losses) / len(losses), seconds


def _batches(loader, sampler: RankBatchSampler, state: TrainState, cfg: TrainConfig):
    """Groups of ``accumulate`` micro-batches, from where ``state`` stands until the epoch budget ends; a resumed
    epoch starts at its saved global batch (the sampler repeats the same order for the same epoch)."""
    while cfg.epochs is None or state.epoch < cfg.epochs:
        sampler.set_epoch(state.epoch, state.batch_in_epoch)
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) == sampler.accumulate:
                yield group
                group = []
        state.epoch += 1
        state.batch_in_epoch = 0


def train(model: ConformerCTC, tokenizer: CharTokenizer, train_utts: list[Utterance], dev_utts: list[Utterance],
          cfg: TrainConfig, out_dir: str | None, *, resume: bool = False,
          progress: bool = True, teacher: torch.nn.Module | None = None, on_step=None) -> dict:
    """Train ``model`` in place. Writes to ``out_dir`` (when given): ``last/``, ``best/``, ``averaged/`` model
    folders, ``snapshots/``, ``log.csv`` and ``train_state.pt`` (see :class:`Checkpointer`). Returns a summary.

    Stops at the first of ``max_steps``, ``epochs`` and ``max_minutes``; Ctrl-C or SIGTERM also stop it
    cleanly after the current step, saving everything needed for ``resume=True``.

    ``on_step(state)``: called after every step with the progress dict (``step``, ``train_seconds``, ...); its own
    time is not counted as training time (e.g. to keep snapshots for a recovery curve).

    ``teacher``: distil from it (``cfg.distill_weight`` > 0). It is moved to the training device (and left there),
    in eval mode and frozen while the loop runs; it sees the same (augmented) features as the student.

    Under torchrun every rank calls this with the same arguments (checked); see the module docstring.
    """
    _check_distill(cfg, model, teacher)
    # The signals are caught outside the process group so that they stay caught while it is torn down: torchrun
    # SIGTERMs every surviving rank the moment one dies, and rank 0, already unwinding from the failed
    # collective, must live to say "lost contact ..." rather than vanish with exit -15.
    with StopSignals(announce=launched_world().is_main) as signals, joined_world(
            _resolve_device(cfg.device), cfg.dist_timeout, "training",
            "Rerun the same command with --resume to continue from the last save") as world:
        return _train(model, tokenizer, train_utts, dev_utts, cfg, out_dir, world, resume, progress, teacher, on_step,
                      signals)


def _train(model, tokenizer, train_utts, dev_utts, cfg: TrainConfig, out_dir, world: World, resume: bool,
           progress: bool, teacher, on_step, signals: StopSignals) -> dict:
    device = rank_device(world, _resolve_device(cfg.device))
    data = data_fingerprint(train_utts)
    agree(world, {"batch_seconds": cfg.batch_seconds, "accumulate": cfg.accumulate, "seed": cfg.seed,
                  "max_steps": cfg.max_steps, "epochs": cfg.epochs, "lr": cfg.lr, "resume": resume,
                  "out": out_dir, "data": data, "dev": data_fingerprint(dev_utts)})
    random.seed(cfg.seed * 1000 + world.rank)  # augmentation differs per rank; the weights come from rank 0
    torch.manual_seed(cfg.seed)
    model.to(device)
    sampler, loader = make_loaders(model, tokenizer, train_utts, cfg, world)
    opt = build_optimizer(model, cfg)
    total = total_steps(cfg, sampler.steps_per_epoch())
    state, ckpt = TrainState(), Checkpointer(out_dir, model, tokenizer, cfg, opt.optimizer, world, data)
    if resume and ckpt.resume(state, device):
        _say(world, f"resumed at step {state.step} (epoch {state.epoch}, global batch {state.batch_in_epoch})"
             + _mapping_note(state, world, cfg))
    state.world_size, state.accumulate = world.size, cfg.accumulate
    if world.active or cfg.accumulate > 1:
        _say(world, f"data-parallel: {world.size} process(es) x {cfg.accumulate} micro-batch(es) x "
             f"{cfg.batch_seconds:g} s = {world.size * cfg.accumulate * cfg.batch_seconds:g} s of padded audio "
             f"per optimizer step; {sampler.steps_per_epoch()} steps per epoch")
    validate = _validator(model, dev_utts, tokenizer, device, opt.frozen, cfg, world)
    step = TrainStep(model, teacher, opt, cfg, device, total, world)
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=not (progress and world.is_main),
               dynamic_ncols=True)
    _train_mode(model, opt.frozen)
    release_teacher = _freeze_teacher(teacher, device)
    reason = "finished"
    run = _Run(step, state, ckpt, validate, cfg, total, world, sampler.per_step, bar, on_step, opt, device, signals)
    try:
        _loop(run, _batches(loader, sampler, state, cfg))
    except _StopRequested as why:
        reason = str(why)
    finally:
        bar.close()
        step.close()
        release_teacher()
    return _finish(model, ckpt, state, reason, validate, bool(dev_utts))


@dataclass
class _Run:
    """What the loop needs, gathered once by :func:`_train`."""

    step: TrainStep
    state: TrainState
    ckpt: Checkpointer
    validate: object
    cfg: TrainConfig
    total: int | None
    world: World
    batches_per_step: int  # global batches one optimizer step consumes
    bar: tqdm
    on_step: object
    opt: Optimization
    device: str
    signals: StopSignals  # Ctrl-C / SIGTERM asked the run to stop


def _loop(run: _Run, groups) -> None:
    """Steps until a budget ends (raises _StopRequested). Every rank agrees each step, in one small all-reduce,
    on the loss, the audio seen and whether to stop (one rank out of time or interrupted stops them all)."""
    state, cfg = run.state, run.cfg
    start_time, seconds_before = time.time(), state.train_seconds
    minutes = seconds_before / 60  # agreed by all ranks (their mean), so they share one learning rate
    signals = run.signals
    t_prev = time.time()
    for group in groups:
        if run.total is not None and state.step >= run.total:
            raise _StopRequested("max steps")
        waited = time.time() - t_prev  # waiting for the loader: the data bottleneck
        loss, seconds = run.step(group, state.step, minutes / cfg.max_minutes if cfg.max_minutes else None)
        loss, seconds, minutes, interrupted = sum_values(
            run.world, [loss, seconds, (time.time() - start_time + seconds_before) / 60, float(signals.requested)],
            run.device)
        loss, minutes = loss / run.world.size, minutes / run.world.size
        state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + run.batches_per_step
        state.audio_seconds += seconds
        state.data_wait_seconds += waited
        state.train_seconds += time.time() - t_prev  # data loading included: the speed a user waits for
        _after_step(run, loss)
        if cfg.max_minutes is not None and minutes >= cfg.max_minutes:
            raise _StopRequested("max minutes")
        if interrupted:
            raise _StopRequested("interrupted")
        t_prev = time.time()  # validation and saving are not training speed


def _after_step(run: _Run, loss: float) -> None:
    """Progress bar, validation, log and saves of the step just taken."""
    state, cfg = run.state, run.cfg
    lr = run.opt.optimizer.param_groups[0]["lr"]
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", epoch=state.epoch,
                        audio_s_per_s=f"{state.audio_seconds / max(1e-9, state.train_seconds):.1f}")
    rates = run.validate() if state.step % cfg.eval_every == 0 else {}
    if state.step % cfg.eval_every == 0:
        if rates:
            _say(run.world, f"step {state.step}: dev WER {rates['wer']:.2%} CER {rates['cer']:.2%}")
        run.ckpt.after_validation(state, rates)
    run.ckpt.log(state, loss, lr, rates)
    if state.step % cfg.save_every == 0:
        run.ckpt.save_resumable(state)
    if run.on_step is not None:
        run.on_step(dataclasses.asdict(state))


def _say(world: World, message: str) -> None:
    """A line for the person watching, from rank 0 only, on stderr (stdout is the summary's), around the bar."""
    if world.is_main:
        tqdm.write(message, file=sys.stderr)


def _mapping_note(state: TrainState, world: World, cfg: TrainConfig) -> str:
    """How a position saved by a run of another shape maps onto this one."""
    if (state.world_size, state.accumulate) == (world.size, cfg.accumulate):
        return ""
    return (f"; saved by {state.world_size} process(es) x {state.accumulate} micro-batch(es), now {world.size} x "
            f"{cfg.accumulate}: the data continues at the same global batch, the step count carries on, and each "
            f"step now takes {world.size * cfg.accumulate} batches instead of {state.world_size * state.accumulate}")


def _train_mode(model: torch.nn.Module, frozen: list[torch.nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()  # no dropout where nothing learns


def _validator(model, dev_utts, tokenizer, device, frozen, cfg: TrainConfig, world: World):
    """A function giving dev WER/CER of the model as it stands ({} without dev data), back in training mode.
    Each rank decodes its share; the hypotheses are gathered and scored once, over all of them."""
    decoder = GreedyDecoder(tokenizer)
    kept = dev_utts[: cfg.dev_limit] if cfg.dev_limit else dev_utts
    loader = dev_loader(model, tokenizer, kept, cfg, world)

    def validate() -> dict:
        if not kept:
            return {}
        hyps = {}
        for part in gather_objects(world, decode_batches(model, decoder, loader, device) if loader else {}):
            hyps.update(part)
        rates = error_rates([u.text for u in kept], [hyps[u.id] for u in kept])
        _train_mode(model, frozen)
        return {**rates, "utterances": len(kept)}
    return validate


def _finish(model, ckpt: Checkpointer, state: TrainState, reason: str, validate, has_dev: bool) -> dict:
    """Final saves (an interrupted run skips the final validation, so it stops at once) and the summary."""
    summary = state.summary(reason)
    if ckpt.out_dir:
        ckpt.save_resumable(state)
        if reason != "interrupted":
            final = validate() if has_dev else {}
            if final:
                summary["dev_last"] = final
                ckpt.after_validation(state, final, snapshot=False)
            ckpt.save_averaged(state)
        ckpt.save_resumable(state)
        ckpt.close()
    elif has_dev:
        summary["dev_last"] = validate()
    summary["best_wer"] = state.best_wer
    model.eval()
    return summary


def _keep_snapshot(model, out_dir: str, step: int, snapshots: list[str], keep: int) -> None:
    folder = os.path.join(out_dir, "snapshots")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step{step:07d}.safetensors")
    save_file(_snapshot(model), path)
    snapshots.append(path)
    while len(snapshots) > max(1, keep):
        old = snapshots.pop(0)
        if os.path.exists(old):
            os.remove(old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
