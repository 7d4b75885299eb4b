import json

import pytest
import soundfile as sf

from asr_core.config import FeatureConfig
from asr_core.data import (BucketBatchSampler, SpeechDataset, collate, load_utterances, read_librispeech,
                           read_manifest, write_manifest)
from asr_core.errors import SettingsError
from asr_core.text import CharTokenizer
from conftest import speechlike


@pytest.fixture
def tiny_librispeech(tmp_path):
    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    lines = []
    for i, (seconds, ext) in enumerate([(1.0, "flac"), (2.0, "wav"), (0.5, "flac")]):
        sf.write(chapter / f"19-198-{i:04d}.{ext}", speechlike(seconds, seed=i), 16000)
        lines.append(f"19-198-{i:04d} WORDS NUMBER {i}")
    (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "ls"


def test_librispeech_and_manifest_round_trip(tiny_librispeech, tmp_path):
    utts = read_librispeech(str(tiny_librispeech))
    assert [u.id for u in utts] == ["19-198-0000", "19-198-0001", "19-198-0002"]
    assert [round(u.duration, 2) for u in utts] == [1.0, 2.0, 0.5]
    manifest = tmp_path / "m" / "train.jsonl"
    write_manifest(utts, str(manifest))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert set(rows[0]) >= {"audio_filepath", "text", "duration"}
    back = read_manifest(str(manifest))
    assert [(u.id, u.text, u.duration) for u in back] == [(u.id, u.text, round(u.duration, 3)) for u in utts]


def test_manifest_relative_paths(tiny_librispeech):
    manifest = tiny_librispeech / "rel.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "19/198/19-198-0001.wav", "text": "hi"}) + "\n")
    (u,) = load_utterances(str(manifest))
    assert u.audio_path == str(tiny_librispeech / "19/198/19-198-0001.wav") and round(u.duration, 2) == 2.0


def test_bad_sources(tmp_path):
    with pytest.raises(SettingsError):
        load_utterances(str(tmp_path / "missing"))
    with pytest.raises(SettingsError):
        read_librispeech(str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(SettingsError, match="bad.jsonl:1"):
        read_manifest(str(bad))


def test_dataset_and_collate(tiny_librispeech):
    utts = read_librispeech(str(tiny_librispeech))
    ds = SpeechDataset(utts, FeatureConfig(), CharTokenizer())
    batch = collate([ds[0], ds[1]])
    assert batch["features"].shape == (2, 200, 80)
    assert batch["lengths"].tolist() == [100, 200]
    assert batch["target_lengths"].tolist() == [len("words number zero"), len("words number one")]


def test_bucket_sampler_respects_budget_and_is_deterministic():
    durations = [1.0 + (i * 7919 % 97) / 10 for i in range(200)]
    sampler = BucketBatchSampler(durations, max_seconds=30, seed=3)
    sampler.set_epoch(1)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(max(durations[i] for i in b) * len(b) <= 30 or len(b) == 1 for b in batches)
    assert batches == sampler.batches()
    sampler.set_epoch(2)
    assert batches != sampler.batches()


def test_preload_fills_the_cache_with_what_lazy_loading_returns(tiny_librispeech):
    utts = read_librispeech(str(tiny_librispeech))
    lazy = SpeechDataset(utts, FeatureConfig(), CharTokenizer())
    eager = SpeechDataset(utts, FeatureConfig(), CharTokenizer())
    eager.preload(2)
    assert sorted(eager.cache) == [0, 1, 2]
    for i in range(3):
        a, b = lazy.samples(i), eager.samples(i)
        assert a.dtype == b.dtype and (a == b).all()  # int16-rounded either way
        assert (lazy.samples(i) == a).all()  # and the same again once cached
