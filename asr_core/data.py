"""Data sets: LibriSpeech layout or NeMo-style JSONL manifests -> utterances -> padded feature batches."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .audio import audio_duration, load_audio
from .augment import speed_perturb
from .config import FeatureConfig
from .errors import AudioError, SettingsError
from .features import log_mel
from .text import CharTokenizer, normalize_text

AUDIO_EXTENSIONS = (".flac", ".wav", ".opus", ".ogg", ".mp3")


@dataclass
class Utterance:
    id: str
    audio_path: str
    text: str
    duration: float


def read_librispeech(root: str) -> list[Utterance]:
    """Every ``SPEAKER/CHAPTER/ID.{flac,wav,opus,...}`` listed in a ``SPEAKER-CHAPTER.trans.txt`` under root."""
    utterances = []
    for trans in sorted(Path(root).rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            for ext in AUDIO_EXTENSIONS:
                audio = trans.parent / (utt_id + ext)
                if audio.exists():
                    utterances.append(Utterance(utt_id, str(audio), text, audio_duration(str(audio))))
                    break
    if not utterances:
        raise SettingsError(f"No LibriSpeech-style transcripts (*.trans.txt) with audio found under {root}")
    return utterances


def read_manifest(path: str) -> list[Utterance]:
    """NeMo JSONL: one ``{"audio_filepath", "text", "duration"}`` per line; relative paths from the manifest's folder."""
    base = os.path.dirname(os.path.abspath(path))
    utterances = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                audio = row["audio_filepath"]
            except (json.JSONDecodeError, KeyError) as err:
                raise SettingsError(f"{path}:{n}: not a manifest line ({err})") from None
            audio = audio if os.path.isabs(audio) else os.path.join(base, audio)
            duration = row.get("duration") or audio_duration(audio)
            utt_id = row.get("id") or Path(audio).stem
            utterances.append(Utterance(utt_id, audio, row.get("text", ""), float(duration)))
    return utterances


def load_utterances(source: str, limit: int | None = None) -> list[Utterance]:
    """A LibriSpeech folder or a JSONL manifest; ``limit`` keeps the first N (in a stable, sorted order)."""
    if not os.path.exists(source):
        raise SettingsError(f"Data not found: {source}")
    utterances = read_librispeech(source) if os.path.isdir(source) else read_manifest(source)
    return utterances[:limit] if limit else utterances


def read_audio_files(source: str) -> list[Utterance]:
    """Any audio, no transcripts needed: a LibriSpeech folder (texts kept), a JSONL manifest, a folder of audio
    files (searched recursively, text "") or one audio file. Unreadable files are left out; none readable raises.

    For calibration and distillation, which learn from the audio alone (the teacher supplies the targets).
    """
    if not os.path.exists(source):
        raise SettingsError(f"Audio not found: {source}")
    if os.path.isfile(source) and not source.lower().endswith(AUDIO_EXTENSIONS):
        return read_manifest(source)
    if os.path.isdir(source) and any(Path(source).rglob("*.trans.txt")):
        return read_librispeech(source)
    paths = [Path(source)] if os.path.isfile(source) else sorted(
        p for p in Path(source).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    utterances = []
    for path in paths:
        try:
            utterances.append(Utterance(path.stem, str(path), "", audio_duration(str(path))))
        except AudioError:
            continue  # a corrupt or non-audio file among many: skip it, the count below says what is left
    if not utterances:
        raise SettingsError(f"No readable audio ({', '.join(AUDIO_EXTENSIONS)}) found in {source}")
    return utterances


def write_manifest(utterances: list[Utterance], out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for u in utterances:
            f.write(json.dumps({"audio_filepath": os.path.abspath(u.audio_path), "text": u.text,
                                "duration": round(u.duration, 3), "id": u.id}) + "\n")


class SpeechDataset(Dataset):
    """Item i -> (features (T, F), target ids (S,), utterance id).

    Decoded audio is cached in memory as int16 (5 h of 16 kHz speech is 0.6 GB), since decoding Opus costs
    more than computing features. ``speed_factors`` picks one factor per item at random (training only).
    """

    def __init__(self, utterances: list[Utterance], features: FeatureConfig, tokenizer: CharTokenizer,
                 speed_factors: tuple[float, ...] = (1.0,), cache_audio: bool = True):
        self.utterances = utterances
        self.features = features
        self.tokenizer = tokenizer
        self.speed_factors = speed_factors
        self.cache: dict[int, np.ndarray] | None = {} if cache_audio else None

    def __len__(self) -> int:
        return len(self.utterances)

    def preload(self, processes: int) -> None:
        """Decode every utterance now, in ``processes`` parallel processes, into the int16 cache.

        Call before creating DataLoader workers: forked workers then share one cache instead of each decoding
        (and holding) its own copy.
        """
        from concurrent.futures import ProcessPoolExecutor

        if self.cache is None:
            return
        todo = [i for i in range(len(self.utterances)) if i not in self.cache]
        paths = [self.utterances[i].audio_path for i in todo]
        with ProcessPoolExecutor(max(1, processes)) as pool:
            for i, samples in zip(todo, pool.map(_decode_int16, paths, chunksize=8)):
                self.cache[i] = samples

    def samples(self, i: int) -> np.ndarray:
        if self.cache is None:
            return load_audio(self.utterances[i].audio_path, allow_silence=True)
        if i not in self.cache:
            self.cache[i] = _decode_int16(self.utterances[i].audio_path)
        return self.cache[i].astype(np.float32) / 32768.0  # int16-rounded, the same on first and later reads

    def __getitem__(self, i: int):
        samples = self.samples(i)
        factor = random.choice(self.speed_factors)
        feats = log_mel(speed_perturb(samples, factor), self.features)
        target = torch.tensor(self.tokenizer.encode(self.utterances[i].text), dtype=torch.long)
        return feats, target, self.utterances[i].id


def _decode_int16(path: str) -> np.ndarray:
    return np.clip(load_audio(path, allow_silence=True) * 32768.0, -32768, 32767).astype(np.int16)


def collate(batch):
    """List of items -> dict(features (B, T, F), lengths (B,), targets (B, S) padded with 0, target_lengths, ids)."""
    feats, targets, ids = zip(*batch)
    lengths = torch.tensor([f.shape[0] for f in feats])
    target_lengths = torch.tensor([t.shape[0] for t in targets])
    padded = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
    tpad = torch.zeros(len(targets), max(1, int(target_lengths.max())), dtype=torch.long)
    for b, (f, t) in enumerate(zip(feats, targets)):
        padded[b, : f.shape[0]] = f
        tpad[b, : t.shape[0]] = t
    return {"features": padded, "lengths": lengths, "targets": tpad, "target_lengths": target_lengths, "ids": list(ids)}


class BucketBatchSampler(Sampler):
    """Batches of similar length whose padded duration (longest x count) stays within ``max_seconds``.

    Deterministic for a (seed, epoch): call :meth:`set_epoch` before iterating. Utterances longer than the
    budget get a batch of their own.
    """

    def __init__(self, durations: list[float], max_seconds: float, shuffle: bool = True, seed: int = 0):
        if max_seconds <= 0:
            raise SettingsError(f"max seconds per batch must be positive, got {max_seconds}")
        self.durations, self.max_seconds, self.shuffle, self.seed = durations, max_seconds, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1000 + self.epoch)
        # jitter the sort key so bucket boundaries move between epochs
        key = [d * (1 + 0.1 * rng.random()) if self.shuffle else d for d in self.durations]
        order = sorted(range(len(key)), key=key.__getitem__)
        batches, current, longest = [], [], 0.0
        for i in order:
            longest_if_added = max(longest, self.durations[i])
            if current and longest_if_added * (len(current) + 1) > self.max_seconds:
                batches.append(current)
                current, longest_if_added = [], self.durations[i]
            current.append(i)
            longest = longest_if_added
        if current:
            batches.append(current)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class RankBatchSampler(Sampler):
    """This rank's share of an epoch of :class:`BucketBatchSampler` batches, from a position in it.

    Every rank computes the same global order (seeded by seed and epoch). Optimizer step ``s`` of a run of
    ``world_size`` ranks with ``accumulate`` micro-batches each takes global batches ``[s*W*K, (s+1)*W*K)``:
    micro-batch ``m`` of rank ``r`` is global batch ``start + (s*K + m)*W + r``. So ranks see disjoint audio, and
    the position in an epoch is a count of global batches (``start``), the same whatever W and K: a run can
    resume on a different number of processes exactly where it stopped. The last step of an epoch is filled
    with batches from the epoch's start, so every rank takes the same number of steps and every utterance is
    seen at least once per epoch.
    """

    def __init__(self, base: BucketBatchSampler, rank: int = 0, world_size: int = 1, accumulate: int = 1):
        if accumulate < 1:
            raise SettingsError(f"accumulate must be 1 or more, got {accumulate}", setting="accumulate")
        self.base, self.rank, self.world_size, self.accumulate = base, rank, world_size, accumulate
        self.start = 0

    @property
    def per_step(self) -> int:
        """Global batches one optimizer step consumes (W x K)."""
        return self.world_size * self.accumulate

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.start = start

    def steps_per_epoch(self) -> int:
        return -(-len(self.base) // self.per_step)

    def __iter__(self):
        batches = self.base.batches()
        n_steps = -(-(len(batches) - self.start) // self.per_step) if self.start < len(batches) else 0
        for g in range(self.start + self.rank, self.start + n_steps * self.per_step, self.world_size):
            yield batches[g % len(batches)]

    def __len__(self) -> int:
        """Micro-batches this rank takes from ``start`` to the end of the epoch."""
        remaining = max(0, len(self.base) - self.start)
        return -(-remaining // self.per_step) * self.accumulate
