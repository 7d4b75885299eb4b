"""The one training loop: CTC in fp32, AdamW, warmup + cosine decay, clipping, validation WER, best/last/
averaged checkpoints, and resume after interruption with nothing lost.

Compression's recovery fine-tuning calls :func:`train` too: its constraints (pruning masks, shared cluster
values, quantisation grids) are parametrizations of the weights, so the loop needs no special case.
"""
from __future__ import annotations

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


def frozen_modules(model: ConformerCTC, n_blocks: int, flag: str = "--freeze-layers") -> list[torch.nn.Module]:
    """The conv stem, the dropout after it and the first ``n_blocks`` blocks (none when 0). ``flag`` names the
    option in the message when ``n_blocks`` is out of range."""
    if not 0 <= n_blocks <= model.cfg.n_layers:
        raise SettingsError(f"{flag} must be between 0 and the model's {model.cfg.n_layers} blocks, "
                            f"got {n_blocks}")
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


class _StopRequested(Exception):
    pass


def train(model: ConformerCTC, tokenizer: CharTokenizer, train_utts: list[Utterance], dev_utts: list[Utterance],
          cfg: TrainConfig, out_dir: str | None, *, resume: bool = False,
          progress: bool = True, teacher: torch.nn.Module | None = None, on_step=None) -> dict:
    """Train ``model`` in place. Writes to ``out_dir`` (when given): ``last/``, ``best/``, ``averaged/`` model
    folders, ``snapshots/``, ``log.csv`` and ``train_state.pt``. Returns a summary dict.

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

    dataset = SpeechDataset(train_utts, model.cfg.features, tokenizer, speed_factors=tuple(cfg.speed_factors))
    if cfg.workers > 0:
        dataset.preload(cfg.workers)  # one shared cache for all workers (see SpeechDataset.preload)
    sampler = BucketBatchSampler([u.duration for u in train_utts], cfg.batch_seconds, shuffle=True, seed=cfg.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                        persistent_workers=cfg.workers > 0)
    dev_utts = dev_utts[: cfg.dev_limit] if cfg.dev_limit else dev_utts
    dev_loader = None
    if dev_utts:
        dev_set = SpeechDataset(dev_utts, model.cfg.features, tokenizer)
        dev_loader = DataLoader(dev_set, batch_sampler=BucketBatchSampler([u.duration for u in dev_utts],
                                                                          cfg.batch_seconds, shuffle=False),
                                collate_fn=collate)
    decoder = GreedyDecoder(tokenizer)

    fixed = frozen_modules(model, cfg.freeze_layers)
    for module in fixed:
        module.requires_grad_(False)
    if not cfg.slow_lr_scale > 0:
        raise SettingsError(f"--slow-lr-scale must be above 0 (use --freeze-layers to freeze), got {cfg.slow_lr_scale}")
    slow_ids = {id(p) for module in frozen_modules(model, cfg.slow_layers, "--slow-layers")
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
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    batches_per_epoch = len(sampler)
    total = cfg.max_steps
    if cfg.epochs is not None:
        by_epochs = math.ceil(cfg.epochs * batches_per_epoch)
        total = by_epochs if total is None else min(total, by_epochs)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_wer": float("inf"), "audio_seconds": 0.0,
             "train_seconds": 0.0, "data_wait_seconds": 0.0}
    snapshots: list[str] = []
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if resume and out_dir and os.path.exists(os.path.join(out_dir, STATE_FILE)):
        saved = torch.load(os.path.join(out_dir, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.to(device) for k, v in read_state(os.path.join(out_dir, "last")).items()})
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["progress"])
        snapshots = list(saved["snapshots"])
        random.setstate(saved["python_rng"])
        torch.set_rng_state(saved["torch_rng"])
        tqdm.write(f"resumed at step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")

    def save_resumable():
        if not out_dir:
            return
        save_model(os.path.join(out_dir, "last"), model, tokenizer, half=False, extra=_extra())
        torch.save({"optimizer": optimizer.state_dict(), "progress": dict(state), "snapshots": snapshots,
                    "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                    "train_config": dataclasses.asdict(cfg)}, os.path.join(out_dir, STATE_FILE + ".tmp"))
        os.replace(os.path.join(out_dir, STATE_FILE + ".tmp"), os.path.join(out_dir, STATE_FILE))

    def _extra() -> dict:
        return {"training": {"step": state["step"], "epoch": state["epoch"],
                             "audio_hours_seen": round(state["audio_seconds"] / 3600, 3),
                             "train_minutes": round(state["train_seconds"] / 60, 2),
                             # recovery fine-tuning (compress) must keep these blocks frozen too
                             **({"freeze_layers": cfg.freeze_layers} if cfg.freeze_layers else {}),
                             **({"slow_layers": cfg.slow_layers, "slow_lr_scale": cfg.slow_lr_scale}
                                if cfg.slow_layers and cfg.slow_lr_scale != 1 else {}), **cfg.extra}}

    def validate() -> dict:
        if dev_loader is None:
            return {}
        hyps = decode_batches(model, decoder, dev_loader, device)
        rates = error_rates([u.text for u in dev_utts], [hyps[u.id] for u in dev_utts])
        train_mode()
        return rates

    def train_mode():
        model.train()
        for module in fixed:
            module.eval()  # no dropout where nothing learns

    log_path = os.path.join(out_dir, "log.csv") if out_dir else None
    log_file = open(log_path, "a", newline="") if log_path else None
    log = csv.writer(log_file) if log_file else None
    if log and os.path.getsize(log_path) == 0:
        log.writerow(["step", "epoch", "loss", "lr", "audio_sec_per_sec", "dev_wer", "dev_cer"])

    stop = {"flag": False}

    def request_stop(*_):
        stop["flag"] = True

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} \
        if _in_main_thread() else {}
    start_time = time.time()
    seconds_before = state["train_seconds"]
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device == "cuda")
    # bf16 autocast: ~1.7x faster on CPUs with avx512_bf16 too; the CTC loss itself stays in fp32
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if use_bf16 else _null()
    train_mode()
    release_teacher = _freeze_teacher(teacher, device)
    bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    last_rates: dict = {}
    reason = "finished"
    try:
        while True:
            if cfg.epochs is not None and state["epoch"] >= cfg.epochs:
                break
            sampler.set_epoch(state["epoch"])
            t_prev = time.time()
            for i, batch in enumerate(loader):
                if i < state["batch_in_epoch"]:
                    continue  # resuming inside an epoch: the sampler repeats the same order for the same epoch
                if total is not None and state["step"] >= total:
                    raise _StopRequested("max steps")
                minutes_spent = (time.time() - start_time + seconds_before) / 60
                if cfg.max_minutes is not None and minutes_spent >= cfg.max_minutes:
                    raise _StopRequested("max minutes")
                if stop["flag"]:
                    raise _StopRequested("interrupted")
                state["data_wait_seconds"] += time.time() - t_prev  # waiting for the loader: the data bottleneck
                feats, lengths = batch["features"].to(device, non_blocking=True), batch["lengths"].to(device)
                if cfg.spec_augment:  # on the training device: vectorised, a few kernels per batch
                    feats = spec_augment(feats, lengths, freq_masks=cfg.freq_masks, time_masks=cfg.time_masks)
                frozen = state["step"] < cfg.freeze_encoder_steps
                for p in body:
                    p.requires_grad_(not frozen)
                scale = lr_at(state["step"], total, cfg,
                              minutes_spent / cfg.max_minutes if cfg.max_minutes else None)
                for g in optimizer.param_groups:
                    g["lr"] = g["peak_lr"] * scale
                with autocast:
                    log_probs, out_lengths = model(feats, lengths)
                    with torch.no_grad():
                        teacher_log_probs = teacher(feats, lengths)[0] if teacher is not None else None
                loss = _loss(cfg, log_probs, out_lengths, batch, device, teacher_log_probs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                seconds = float(lengths.sum()) * model.cfg.features.hop_length / model.cfg.features.sample_rate
                dt = time.time() - t_prev  # data loading included: this is the speed a user waits for
                state["step"] += 1
                state["batch_in_epoch"] = i + 1
                state["audio_seconds"] += seconds
                state["train_seconds"] += dt
                speed = state["audio_seconds"] / max(1e-9, state["train_seconds"])
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                audio_s_per_s=f"{speed:.1f}", epoch=state["epoch"])
                row_rates = {}
                if state["step"] % cfg.eval_every == 0:
                    row_rates = last_rates = validate()
                    if row_rates:
                        tqdm.write(f"step {state['step']}: dev WER {row_rates['wer']:.2%} CER {row_rates['cer']:.2%}")
                    if out_dir:
                        _keep_snapshot(model, out_dir, state["step"], snapshots, cfg.average_last)
                        if row_rates and row_rates["wer"] < state["best_wer"]:
                            state["best_wer"] = row_rates["wer"]
                            save_model(os.path.join(out_dir, "best"), model, tokenizer, half=cfg.half_checkpoints,
                                       extra={**_extra(), "dev": {"wer": row_rates["wer"], "cer": row_rates["cer"]}})
                if log and (state["step"] % cfg.log_every == 0 or row_rates):
                    log.writerow([state["step"], state["epoch"], f"{loss.item():.4f}",
                                  f"{optimizer.param_groups[0]['lr']:.3e}", f"{speed:.2f}",
                                  f"{row_rates.get('wer', '')}", f"{row_rates.get('cer', '')}"])
                    log_file.flush()
                if state["step"] % cfg.save_every == 0:
                    save_resumable()
                if on_step is not None:
                    on_step(dict(state))
                t_prev = time.time()  # validation and saving are not training speed
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    except _StopRequested as why:
        reason = str(why)
    finally:
        bar.close()
        release_teacher()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    model.eval()
    summary = {"reason": reason, **{k: state[k] for k in ("step", "epoch", "audio_seconds", "train_seconds")},
               "audio_sec_per_sec": state["audio_seconds"] / max(1e-9, state["train_seconds"]),
               "data_wait_fraction": state["data_wait_seconds"] / max(1e-9, state["train_seconds"])}
    if out_dir:
        save_resumable()
        if reason != "interrupted":
            final = validate() if dev_loader is not None else {}
            if final:
                summary["dev_last"] = final
                if final["wer"] < state["best_wer"]:
                    state["best_wer"] = final["wer"]
                    save_model(os.path.join(out_dir, "best"), model, tokenizer, half=cfg.half_checkpoints,
                               extra={**_extra(), "dev": {"wer": final["wer"], "cer": final["cer"]}})
            if len(snapshots) > 1:
                averaged = average_states([load_file(p) for p in snapshots])
                avg_model = ConformerCTC(model.cfg)
                avg_model.load_state_dict(averaged)
                save_model(os.path.join(out_dir, "averaged"), avg_model, tokenizer, half=cfg.half_checkpoints,
                           extra={**_extra(), "averaged_snapshots": [os.path.basename(p) for p in snapshots]})
        save_resumable()
        log_file.close()
    elif dev_loader is not None:
        summary["dev_last"] = validate()
    summary["best_wer"] = state["best_wer"]
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


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
