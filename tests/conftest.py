import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr_core.checkpoint import save_model
from asr_core.config import preset
from asr_core.model import ConformerCTC
from asr_core.text import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGE_ASR_SHARED", REPO.parent / "shared"))
LIBRISPEECH = SHARED / "data" / "librispeech-mini"
DEV = LIBRISPEECH / "dev-clean-2-a"


def speechlike(seconds: float = 1.0, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic voiced-sounding signal (harmonics with a moving pitch) in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) + 0.05 * rng.standard_normal(t.shape)
    return (0.5 * x / np.max(np.abs(x))).astype(np.float32)


@pytest.fixture(scope="session")
def dev_dir():
    if not DEV.is_dir():
        pytest.skip(f"shared data not found at {DEV}")
    return DEV


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return ConformerCTC(preset("tiny", dropout=0.0)).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("tiny_model")
    save_model(str(folder), tiny_model, CharTokenizer())
    return str(folder)


@pytest.fixture(scope="session")
def tiny_en_finetuned_dir(tmp_path_factory):
    """A model folder as `train --init-from whisper-tiny.en` writes it: two steps at a high rate (so its weights
    have left Whisper's), fp16, with the shipped LM and decoding.json beside it. For what needs a tiny.en-started
    model (wise-ft, its sweep); the shipped baseline is Whisper base, whose weights CI does not install."""
    from asr_core.checkpoint import default_model_dir

    out = tmp_path_factory.mktemp("tiny_en_finetuned") / "run"
    trained = subprocess.run([sys.executable, "-m", "edge_asr", "train", "--data",
                              str(REPO / "assets" / "clips" / "manifest.jsonl"), "--out", str(out), "--preset",
                              "whisper-tiny", "--init-from", "whisper-tiny.en", "--max-steps", "2", "--batch-seconds",
                              "20", "--lr", "1e-2", "--warmup-steps", "1", "--threads", "1", "--half"],
                             capture_output=True, text=True, cwd=REPO)
    assert trained.returncode == 0, trained.stderr
    for name in ("lm.arpa.gz", "decoding.json"):
        shutil.copy(os.path.join(default_model_dir(), name), out / "last" / name)
    return out / "last"


@pytest.fixture
def wav_file(tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, speechlike(1.5), 16000, subtype="PCM_16")
    return str(path)
