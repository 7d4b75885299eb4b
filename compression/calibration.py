"""Calibration: one pass of a model over unlabelled audio, collecting what the calibrated methods need per layer.

For every Linear and (non-depthwise) convolution, forward pre-hooks accumulate over all frames x of its input
(a convolution's input unfolded into the columns its weight, viewed as (out, in x kernel), multiplies):

- ``gram`` = Σ x xᵀ (in, in): GPTQ's and SparseGPT's Hessian (H = gram / n), SVD-LLM's whitening, the
  least-squares refit of structured pruning; the output covariance W·C·Wᵀ of LiteASR follows from it.
- ``total`` = Σ x (in,): the input mean, for bias correction and FLAP's bias compensation.

Layers fed the same tensor (an attention block's q, k and v projections) share one accumulator. Statistics
are kept in memory, once per baseline, and reused across recipes and knob changes; the features of the
calibration audio are kept too, so a chain can re-collect on its partly compressed model
(:func:`collect_stats` on the same :class:`CalibrationSet`).
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asr_core.audio import load_audio
from asr_core.data import read_audio_files
from asr_core.errors import AudioError, SettingsError
from asr_core.features import log_mel

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "calibration"
MIN_UTTERANCES = 4  # below this a 512-wide Hessian is mostly dampening: refuse rather than mislead
DEFAULT_UTTERANCES = 32
MAX_SECONDS = 30.0  # longer clips are cut: frames beyond that add little and cost memory


@dataclass
class CalibrationSet:
    """Log-mel features of the calibration audio, one (T, F) tensor per utterance, and where they came from."""

    features: list[torch.Tensor]
    source: str
    audio_seconds: float
    config: object = None  # the FeatureConfig they were computed with

    def __len__(self) -> int:
        return len(self.features)


@dataclass
class LayerStats:
    """Input statistics of one layer over n frames: ``gram`` (in, in) and ``total`` (in,), float32."""

    gram: torch.Tensor
    total: torch.Tensor
    n: int = 0
    # what builds derive from these statistics and keep: the Hessian's factors by sweep order
    # (compression.obs.layer_factor), and per layer the weights' SVD-LLM factors and k-means sort
    # (compression.calibrated.kept_for_layer)
    factors: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def hessian(self) -> torch.Tensor:
        """E[x xᵀ] (in, in), float32."""
        return (self.gram / max(1, self.n)).float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(1, self.n)).float()

    @property
    def covariance(self) -> torch.Tensor:
        """E[(x - μ)(x - μ)ᵀ] (in, in), float32."""
        mean = self.total / max(1, self.n)
        return (self.gram / max(1, self.n) - mean[:, None] * mean[None, :]).float()

    @property
    def channel_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all frames, per input channel (Wanda's activation factor), float32."""
        return self.gram.diagonal().clamp_min(0).sqrt().float()


@dataclass
class CalibrationStats:
    """{layer name: LayerStats} for one model, plus the set they came from and what collecting cost."""

    layers: dict[str, LayerStats]
    calibration: CalibrationSet
    seconds: float
    frames: int = 0

    def get(self, name: str) -> LayerStats | None:
        return self.layers.get(name)

    def describe(self) -> str:
        return (f"{len(self.calibration)} utterances ({self.calibration.audio_seconds / 60:.1f} min) from "
                f"{self.calibration.source}, {self.frames} frames, collected in {self.seconds:.1f} s")


def load_calibration(source: str | None = None, utterances: int | None = None, features=None) -> CalibrationSet:
    """Audio (a folder of any audio, a LibriSpeech folder or a manifest; no transcripts needed) -> features.

    ``source`` None: the set bundled in ``assets/calibration/``. ``utterances``: how many to use (default
    :data:`DEFAULT_UTTERANCES`), spread evenly over the sorted list so that every speaker of a folder is met.
    Unreadable or silent files are skipped; fewer than :data:`MIN_UTTERANCES` usable ones is an error.
    """
    from asr_core.config import FeatureConfig

    features = features or FeatureConfig()
    path = str(source or BUNDLED)
    if source is None and not BUNDLED.is_dir():
        raise SettingsError(f"the bundled calibration set is missing ({BUNDLED}); give --calib DATA")
    wanted = DEFAULT_UTTERANCES if utterances is None else utterances
    if wanted < MIN_UTTERANCES:
        raise SettingsError(f"--calib-utterances must be at least {MIN_UTTERANCES}, got {wanted}")
    found = read_audio_files(path)
    step = max(1.0, len(found) / wanted)
    chosen = [found[int(i * step)] for i in range(min(wanted, len(found)))]
    feats, seconds = [], 0.0
    for utt in chosen:
        try:
            samples = load_audio(utt.audio_path)[: int(MAX_SECONDS * features.sample_rate)]
        except AudioError:
            continue  # silent, too short or corrupt: one bad clip must not stop calibration
        feats.append(log_mel(samples, features))
        seconds += len(samples) / features.sample_rate
    if len(feats) < MIN_UTTERANCES:
        raise SettingsError(f"calibration needs at least {MIN_UTTERANCES} readable utterances; {path} gave "
                            f"{len(feats)} of {len(chosen)} tried")
    return CalibrationSet(feats, path, seconds, features)


def calibrated_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer that a method may transform and that calibration therefore watches."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(m, "groups", 1) == 1
            and ".parametrizations." not in name]


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows its weight (out, in x kernel) multiplies: (N, in x kernel)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):  # (B, C, T) -> unfold as a 2-D image of height 1
        x = x.unsqueeze(2)
        kernel, stride, pad, dil = ((1, module.kernel_size[0]), (1, module.stride[0]), (0, module.padding[0]),
                                    (1, module.dilation[0]))
    else:
        kernel, stride, pad, dil = module.kernel_size, module.stride, module.padding, module.dilation
    cols = F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)  # (B, C x k, L): C-major as the weight
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_width(module: nn.Module) -> int:
    """Columns of the layer's weight viewed as a matrix: in_features, or in_channels x kernel size."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels * math.prod(module.kernel_size)


@torch.no_grad()
def collect_stats(model: nn.Module, calibration: CalibrationSet, progress=None) -> CalibrationStats:
    """Run ``model`` over every calibration utterance (one at a time: no padding) and accumulate each layer's
    input statistics. ``progress(done, total)`` is called after each utterance when given."""
    start = time.perf_counter()
    cfg = getattr(model, "cfg", None)
    if calibration.config is not None and cfg is not None and calibration.config != cfg.features:
        raise SettingsError("the calibration features were computed for another front-end than this model's")
    runs = ((lambda f=f: model(f[None], torch.tensor([f.shape[0]]))) for f in calibration.features)
    stats = accumulate(model, calibrated_layers(model), runs, progress, len(calibration))
    return CalibrationStats(stats, calibration, time.perf_counter() - start,
                            sum(f.shape[0] for f in calibration.features))


@torch.no_grad()
def accumulate(model: nn.Module, layers, runs, progress=None, total: int = 0) -> dict[str, LayerStats]:
    """Hook ``layers`` ((name, module) pairs inside ``model``), call each of ``runs`` (one forward pass each),
    and return {name: LayerStats} of what the layers saw."""
    stats: dict[str, LayerStats] = {}
    # inputs seen in this pass, by identity (held, so that their ids cannot be reused) -> their stats
    shared: dict[int, tuple[torch.Tensor, LayerStats]] = {}

    def hook(name):
        def pre_hook(module, args):
            x = args[0]
            if id(x) in shared:  # q, k and v see the same tensor: accumulate it once
                stats.setdefault(name, shared[id(x)][1])
                return
            s = stats.setdefault(name, _empty(input_width(module)))
            shared[id(x)] = (x, s)
            rows = layer_inputs(module, x).float()
            s.gram.addmm_(rows.T, rows)  # float32: a float64 copy of a 2048² Gram costs more than the product
            s.total += rows.sum(0)
            s.n += rows.shape[0]
        return pre_hook

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
    was_training = model.training
    model.eval()
    try:
        for i, run in enumerate(runs):
            shared.clear()
            run()
            if progress:
                progress(i + 1, total)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


class _Captured(Exception):
    pass


@torch.no_grad()
def block_inputs(model: nn.Module, calibration: CalibrationSet) -> list[tuple]:
    """What the first block receives for each calibration utterance: [(x (1, T', D), frame_mask (1, T'))], as
    the model computes it (captured by a hook, the rest of the forward pass skipped)."""
    inputs = []

    def capture(module, args):
        inputs.append(tuple(a.detach() for a in args))
        raise _Captured

    handle = model.blocks[0].register_forward_pre_hook(capture)
    was_training = model.training
    model.eval()
    try:
        for f in calibration.features:
            try:
                model(f[None], torch.tensor([f.shape[0]]))
            except _Captured:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    return inputs


def _empty(width: int) -> LayerStats:
    return LayerStats(torch.zeros(width, width), torch.zeros(width))


def dampened(hessian: torch.Tensor, percent: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's conditioning: dead inputs (zero diagonal) get 1 on the diagonal; then λ = percent x mean diagonal
    is added. Returns (H + λI, dead mask (in,)). Raises SettingsError if H has NaN/inf."""
    if not torch.isfinite(hessian).all():
        raise SettingsError("calibration statistics hold NaN or inf values (corrupt audio?); cannot calibrate")
    h = hessian.clone().float()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    damp = percent * float(h.diagonal().mean())
    h.diagonal().add_(damp if math.isfinite(damp) and damp > 0 else 1e-6)
    return h, dead


_BUNDLED_STATS: "weakref.WeakKeyDictionary[nn.Module, CalibrationStats]" = weakref.WeakKeyDictionary()


def bundled_stats(model: nn.Module) -> CalibrationStats:
    """The model's statistics on the bundled calibration set, collected on first use and kept while the model
    lives (compressing never changes the baseline in place: recipes work on a copy)."""
    if model not in _BUNDLED_STATS:
        _BUNDLED_STATS[model] = collect_stats(model, load_calibration(features=model.cfg.features))
    return _BUNDLED_STATS[model]


def stats_for(model: nn.Module, source: str | None = None, utterances: int | None = None) -> CalibrationStats:
    """The model's statistics on ``source`` (``utterances`` of it), or on the bundled set (cached) when neither
    is given: what ``--calib`` / ``--calib-utterances`` ask for, in the CLI, the benchmark and the app alike."""
    if source is None and utterances is None:
        return bundled_stats(model)
    return collect_stats(model, load_calibration(source, utterances, features=model.cfg.features))


def cholesky_dampened(matrix: torch.Tensor, percent: float = 1e-4) -> torch.Tensor:
    """Lower Cholesky factor (float64) of ``matrix`` dampened as :func:`dampened`, ten times harder each time it
    is not positive definite (rank-deficient statistics from few frames), up to four times; then SettingsError."""
    for attempt in range(5):
        h, _ = dampened(matrix, percent * 10 ** attempt)
        lower, info = torch.linalg.cholesky_ex(h.double())
        if int(info) == 0:
            return lower
    raise SettingsError("a layer's calibration covariance is singular even after dampening; give more (or more "
                        "varied) calibration audio")
