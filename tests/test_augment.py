"""SpecAugment masks stay inside each utterance, respect the policy's widths, and fill with the utterance mean;
speed perturbation changes duration by the factor."""
import numpy as np
import torch

from asr_core.augment import spec_augment, speed_perturb


def test_spec_augment_masks_inside_each_utterance():
    torch.manual_seed(0)
    feats = torch.randn(3, 400, 80) + 5.0
    lengths = torch.tensor([400, 250, 60])
    feats[1, 250:] = 0.0
    feats[2, 60:] = 0.0
    out = spec_augment(feats, lengths, freq_masks=2, freq_width=27, time_masks=10, time_width_ratio=0.05)
    assert out.shape == feats.shape and not torch.equal(out, feats)
    assert torch.equal(out[1, 250:], feats[1, 250:]) and torch.equal(out[2, 60:], feats[2, 60:])  # padding untouched
    for b, n in enumerate(lengths.tolist()):
        changed = out[b, :n] != feats[b, :n]
        mean = feats[b, :n].mean()
        assert torch.allclose(out[b, :n][changed], mean.expand(int(changed.sum())), atol=1e-5)
        # frequency bands: at most 2 x 27 bins fully masked over the whole utterance
        assert int(changed.all(dim=0).sum()) <= 2 * 27
        # time spans: at most 10 x (5% of the length) frames fully masked across all bins
        assert int(changed.all(dim=1).sum()) <= 10 * max(1, int(0.05 * n))


def test_spec_augment_off_and_reproducible():
    feats, lengths = torch.randn(2, 100, 80), torch.tensor([100, 80])
    assert torch.equal(spec_augment(feats, lengths, freq_masks=0, time_masks=0), feats)
    a = spec_augment(feats, lengths, generator=torch.Generator().manual_seed(1))
    b = spec_augment(feats, lengths, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_speed_perturb_changes_duration():
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    assert len(speed_perturb(x, 1.0)) == 16000
    assert abs(len(speed_perturb(x, 1.1)) - 16000 / 1.1) < 5
    assert abs(len(speed_perturb(x, 0.9)) - 16000 / 0.9) < 5
