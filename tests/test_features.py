"""The front-end against values computed independently with librosa 0.11.0 (in a separate venv):

    fb = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)           # Slaney scale and norm (defaults)
    x = 0.5 sin(2π·440 t) + 0.1 sin(2π·3000 t), 0.5 s at 16 kHz (float32)
    S = |librosa.stft(x, n_fft=400, hop_length=160, window="hann", center=True, pad_mode="reflect")|²[:, :-1]
    lm = log10(max(fb @ S, 1e-10)); lm = max(lm, lm.max() - 8); lm = ((lm + 4) / 4).T
"""
import numpy as np
import pytest
import torch

from asr_core.config import FeatureConfig
from asr_core.features import log_mel, mel_filterbank


def test_mel_filterbank_matches_librosa():
    fb = mel_filterbank(16000, 400, 80)
    assert fb.shape == (80, 201)
    assert fb.sum().item() == pytest.approx(1.9990241527557373, rel=1e-5)
    for (i, j), ref in {(0, 1): 0.02486259490251541, (10, 11): 0.004954374860972166, (40, 43): 0.014735566452145576,
                        (40, 44): 0.006518189795315266, (60, 93): 0.006591092795133591,
                        (79, 190): 0.0022320549469441175, (10, 12): 0.0}.items():
        assert fb[i, j].item() == pytest.approx(ref, rel=1e-4, abs=1e-7)
    assert [int(fb[i].argmax()) for i in (0, 20, 40, 60, 79)] == [1, 20, 43, 93, 192]


def test_log_mel_matches_librosa_reference():
    t = np.arange(8000) / 16000
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    lm = log_mel(x, FeatureConfig())
    assert lm.shape == (50, 80)
    for (i, j), ref in {(0, 0): 0.9887460470199585, (25, 10): 1.3487379550933838, (25, 30): -0.5617961883544922,
                        (49, 79): -0.4825558662414551}.items():
        assert lm[i, j].item() == pytest.approx(ref, abs=2e-4)
    assert lm.mean().item() == pytest.approx(-0.39062753319740295, abs=2e-4)
    assert int(lm[25].argmax()) == 11


def test_other_normalisations_and_htk():
    x = torch.randn(16000) * 0.1
    mv = log_mel(x, FeatureConfig(normalize="meanvar"))
    assert mv.mean(dim=0).abs().max() < 1e-4
    htk = mel_filterbank(16000, 400, 40, scale="htk")
    assert htk.shape == (40, 201) and (htk.max(dim=1).values <= 1.0 + 1e-6).all()
