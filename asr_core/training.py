"""The one training loop: CTC in fp32, AdamW, warmup + cosine decay, clipping, validation WER, best/last/
averaged checkpoints, and resume after interruption with nothing lost.

Compression's recovery fine-tuning calls :func:`train` too: its constraints (pruning masks, shared cluster
values, quantisation grids) are parametrizations of the weights, so the loop needs no special case.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from .augment import spec_augment
from .checkpoint import read_state, save_model
from .data import BucketBatchSampler, SpeechDataset, Utterance, collate
from .decoding import GreedyDecoder
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
    batch_seconds: float = 120.0  # padded audio seconds per batch
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


def _check_distill(cfg: TrainConfig, model: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
    """Refuse contradictory loss settings before any work."""
    if cfg.ctc_weight < 0 or cfg.distill_weight < 0:
        raise SettingsError(f"loss weights must not be negative, got ctc_weight={cfg.ctc_weight}, "
                            f"distill_weight={cfg.distill_weight}")
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
          teacher_log_probs: torch.Tensor | None) -> torch.Tensor:
    """ctc_weight * CTC (skipped at weight 0: the data may have no transcripts) + distill_weight * KL."""
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
    """Progress that a resumed run continues from (saved in ``train_state.pt``)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_wer: float = float("inf")
    audio_seconds: float = 0.0
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0

    def summary(self, reason: str) -> dict:
        return {"reason": reason, "step": self.step, "epoch": self.epoch, "audio_seconds": self.audio_seconds,
                "train_seconds": self.train_seconds,
                "audio_sec_per_sec": self.audio_seconds / max(1e-9, self.train_seconds),
                "data_wait_fraction": self.data_wait_seconds / max(1e-9, self.train_seconds)}


def make_loaders(model: ConformerCTC, tokenizer: CharTokenizer, train_utts: list[Utterance],
                 dev_utts: list[Utterance], cfg: TrainConfig):
    """(sampler, train loader, dev loader or None, dev utterances kept)."""
    dataset = SpeechDataset(train_utts, model.cfg.features, tokenizer, speed_factors=tuple(cfg.speed_factors))
    if cfg.workers > 0:
        dataset.preload(cfg.workers)  # one shared cache for all workers (see SpeechDataset.preload)
    sampler = BucketBatchSampler([u.duration for u in train_utts], cfg.batch_seconds, shuffle=True, seed=cfg.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                        persistent_workers=cfg.workers > 0)
    dev_utts = dev_utts[: cfg.dev_limit] if cfg.dev_limit else dev_utts
    if not dev_utts:
        return sampler, loader, None, []
    dev_set = SpeechDataset(dev_utts, model.cfg.features, tokenizer)
    dev_sampler = BucketBatchSampler([u.duration for u in dev_utts], cfg.batch_seconds, shuffle=False)
    return sampler, loader, DataLoader(dev_set, batch_sampler=dev_sampler, collate_fn=collate), dev_utts


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int | None:
    """The step count the schedule runs over: the smaller of max_steps and epochs' worth (None: neither)."""
    total = cfg.max_steps
    if cfg.epochs is not None:
        by_epochs = math.ceil(cfg.epochs * batches_per_epoch)
        total = by_epochs if total is None else min(total, by_epochs)
    return total


class Checkpointer:
    """Everything a run writes under ``out_dir`` (nothing when None): ``last/`` + ``train_state.pt`` (resumable),
    ``best/`` (lowest dev WER), ``snapshots/`` of the last ``average_last`` validations, ``averaged/`` from them,
    and ``log.csv``. Each folder's provenance says what it holds and what was measured on it."""

    def __init__(self, out_dir: str | None, model: ConformerCTC, tokenizer: CharTokenizer, cfg: TrainConfig,
                 optimizer: torch.optim.Optimizer):
        self.out_dir, self.model, self.tokenizer, self.cfg, self.optimizer = out_dir, model, tokenizer, cfg, optimizer
        self.snapshots: list[str] = []
        self._log_file = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)

    def resume(self, state: TrainState, device: str) -> bool:
        """Load last/ and train_state.pt into the model, optimizer, state and RNGs; False when nothing to resume."""
        path = os.path.join(self.out_dir or "", STATE_FILE)
        if not self.out_dir or not os.path.exists(path):
            return False
        saved = torch.load(path, map_location="cpu", weights_only=True)
        last = read_state(os.path.join(self.out_dir, "last"))
        self.model.load_state_dict({k: v.to(device) for k, v in last.items()})
        self.optimizer.load_state_dict(saved["optimizer"])
        for key, value in saved["progress"].items():
            setattr(state, key, value)
        self.snapshots = list(saved["snapshots"])
        random.setstate(saved["python_rng"])
        torch.set_rng_state(saved["torch_rng"])
        return True

    def _provenance(self, state: TrainState, metrics: dict | None = None, **details) -> Provenance:
        cfg = self.cfg
        extra = dict(cfg.extra)
        command = extra.pop("command", "") or current_command()
        parents = extra.pop("parents", [])
        training = {"step": state.step, "epoch": state.epoch,
                    "audio_hours_seen": round(state.audio_seconds / 3600, 3),
                    "train_minutes": round(state.train_seconds / 60, 2),
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
        self._save("last", self.model, self._provenance(state), half=False)
        tmp = os.path.join(self.out_dir, STATE_FILE + ".tmp")
        torch.save({"optimizer": self.optimizer.state_dict(), "progress": dataclasses.asdict(state),
                    "snapshots": self.snapshots, "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                    "train_config": dataclasses.asdict(self.cfg)}, tmp)
        os.replace(tmp, os.path.join(self.out_dir, STATE_FILE))

    def after_validation(self, state: TrainState, rates: dict, snapshot: bool = True) -> None:
        """Keep a snapshot for averaging; a new best dev WER writes best/ (its dev metrics measured on it)."""
        if not self.out_dir:
            return
        if snapshot:
            _keep_snapshot(self.model, self.out_dir, state.step, self.snapshots, self.cfg.average_last)
        if rates and rates["wer"] < state.best_wer:
            state.best_wer = rates["wer"]
            metrics = {"dev": {"wer": rates["wer"], "cer": rates["cer"], "step": state.step,
                               "utterances": rates.get("utterances")}}
            self._save("best", self.model, self._provenance(state, metrics), half=self.cfg.half_checkpoints)

    def save_averaged(self, state: TrainState) -> None:
        if not self.out_dir or len(self.snapshots) < 2:
            return
        averaged = ConformerCTC(self.model.cfg)
        averaged.load_state_dict(average_states([load_file(p) for p in self.snapshots]))
        names = [os.path.basename(p) for p in self.snapshots]
        self._save("averaged", averaged, self._provenance(state, averaged_snapshots=names),
                   half=self.cfg.half_checkpoints)

    def log(self, state: TrainState, loss: float, lr: float, rates: dict) -> None:
        if not self.out_dir or not (state.step % self.cfg.log_every == 0 or rates):
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


class _StopRequested(Exception):
    pass


class StopSignals:
    """Ctrl-C / SIGTERM set a flag the loop checks after each step (so the run stops cleanly and resumes), while
    the ``with`` block lasts; elsewhere the process's handlers stay as they were."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        if _in_main_thread():
            self._old = {s: signal.signal(s, self._request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _request(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


class TrainStep:
    """One optimizer step: SpecAugment, the schedule's learning rate, forward (bf16 autocast when asked), the
    loss (CTC and/or distillation), clipping, AdamW. Returns (loss, audio seconds in the batch)."""

    def __init__(self, model, teacher, opt: Optimization, cfg: TrainConfig, device: str, total: int | None):
        self.model, self.teacher, self.opt, self.cfg, self.device, self.total = model, teacher, opt, cfg, device, total
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device == "cuda")
        # bf16 autocast: ~1.7x faster on CPUs with avx512_bf16 too; the CTC loss itself stays in fp32
        self.autocast = (lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext

    def __call__(self, batch: dict, step: int, time_fraction: float | None) -> tuple[float, float]:
        cfg, device = self.cfg, self.device
        feats, lengths = batch["features"].to(device, non_blocking=True), batch["lengths"].to(device)
        if cfg.spec_augment:  # on the training device: vectorised, a few kernels per batch
            feats = spec_augment(feats, lengths, freq_masks=cfg.freq_masks, time_masks=cfg.time_masks)
        encoder_frozen = step < cfg.freeze_encoder_steps
        for p in self.opt.body:
            p.requires_grad_(not encoder_frozen)
        scale = lr_at(step, self.total, cfg, time_fraction)
        for g in self.opt.optimizer.param_groups:
            g["lr"] = g["peak_lr"] * scale
        with self.autocast():
            log_probs, out_lengths = self.model(feats, lengths)
            with torch.no_grad():
                teacher_log_probs = self.teacher(feats, lengths)[0] if self.teacher is not None else None
        loss = _loss(cfg, log_probs, out_lengths, batch, device, teacher_log_probs)
        self.opt.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.optimizer.step()
        features = self.model.cfg.features
        return loss.item(), float(lengths.sum()) * features.hop_length / features.sample_rate


def _batches(loader, sampler, state: TrainState, cfg: TrainConfig):
    """Batches from where ``state`` stands until the epoch budget ends; a resumed epoch skips what it saw (the
    sampler repeats the same order for the same epoch)."""
    while cfg.epochs is None or state.epoch < cfg.epochs:
        sampler.set_epoch(state.epoch)
        for i, batch in enumerate(loader):
            if i >= state.batch_in_epoch:
                yield i, batch
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
    """
    _check_distill(cfg, model, teacher)
    device = _resolve_device(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.to(device)
    sampler, loader, dev_loader, dev_utts = make_loaders(model, tokenizer, train_utts, dev_utts, cfg)
    opt = build_optimizer(model, cfg)
    total = total_steps(cfg, len(sampler))
    state, ckpt = TrainState(), Checkpointer(out_dir, model, tokenizer, cfg, opt.optimizer)
    if resume and ckpt.resume(state, device):
        tqdm.write(f"resumed at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    validate = _validator(model, dev_loader, dev_utts, tokenizer, device, opt.frozen)
    step = TrainStep(model, teacher, opt, cfg, device, total)
    start_time, seconds_before, reason = time.time(), state.train_seconds, "finished"
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    _train_mode(model, opt.frozen)
    release_teacher = _freeze_teacher(teacher, device)
    try:
        with StopSignals() as signals:
            t_prev = time.time()
            for i, batch in _batches(loader, sampler, state, cfg):
                minutes_spent = (time.time() - start_time + seconds_before) / 60
                _check_stop(state, total, cfg, minutes_spent, signals)
                state.data_wait_seconds += time.time() - t_prev  # waiting for the loader: the data bottleneck
                loss, seconds = step(batch, state.step, minutes_spent / cfg.max_minutes if cfg.max_minutes else None)
                state.step, state.batch_in_epoch = state.step + 1, i + 1
                state.audio_seconds += seconds
                state.train_seconds += time.time() - t_prev  # data loading included: the speed a user waits for
                lr = opt.optimizer.param_groups[0]["lr"]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", epoch=state.epoch,
                                audio_s_per_s=f"{state.audio_seconds / max(1e-9, state.train_seconds):.1f}")
                rates = validate() if state.step % cfg.eval_every == 0 else {}
                if state.step % cfg.eval_every == 0:
                    if rates:
                        tqdm.write(f"step {state.step}: dev WER {rates['wer']:.2%} CER {rates['cer']:.2%}")
                    ckpt.after_validation(state, rates)
                ckpt.log(state, loss, lr, rates)
                if state.step % cfg.save_every == 0:
                    ckpt.save_resumable(state)
                if on_step is not None:
                    on_step(dataclasses.asdict(state))
                t_prev = time.time()  # validation and saving are not training speed
    except _StopRequested as why:
        reason = str(why)
    finally:
        bar.close()
        release_teacher()
    return _finish(model, ckpt, state, reason, validate, dev_loader is not None)


def _check_stop(state: TrainState, total: int | None, cfg: TrainConfig, minutes_spent: float,
                signals: StopSignals) -> None:
    if total is not None and state.step >= total:
        raise _StopRequested("max steps")
    if cfg.max_minutes is not None and minutes_spent >= cfg.max_minutes:
        raise _StopRequested("max minutes")
    if signals.requested:
        raise _StopRequested("interrupted")


def _train_mode(model: torch.nn.Module, frozen: list[torch.nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()  # no dropout where nothing learns


def _validator(model, dev_loader, dev_utts, tokenizer, device, frozen):
    """A function giving dev WER/CER of the model as it stands ({} without dev data), back in training mode."""
    decoder = GreedyDecoder(tokenizer)

    def validate() -> dict:
        if dev_loader is None:
            return {}
        hyps = decode_batches(model, decoder, dev_loader, device)
        rates = error_rates([u.text for u in dev_utts], [hyps[u.id] for u in dev_utts])
        _train_mode(model, frozen)
        return {**rates, "utterances": len(dev_utts)}
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
