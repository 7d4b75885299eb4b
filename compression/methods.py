"""The compression methods. Each is a settings dataclass (validated before any work) plus ``apply``.

``apply(model, settings, layers)`` changes the model in place and returns it. Weight constraints are
``torch.nn.utils.parametrize`` parametrizations on ``Linear.weight`` (a pruning mask, a shared codebook, a
straight-through fake quantizer), so the model still trains: recovery fine-tuning runs the ordinary
training loop of ``asr_core`` and every step keeps the constraint by construction. Methods that change the
architecture (structured pruning, low-rank factorisation) replace modules and, for structured pruning, the
config. :mod:`compression.artifact` turns the result into packed bytes and back.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from asr_core.errors import SettingsError
from asr_core.model import ConformerCTC

from . import calibrated
from .obs import row_mask
from .quantize import ACTIVATIONS, FakeQuant

# Layers left in higher precision (fp16) unless the recipe says otherwise: the first layer (it sees raw
# features; its errors reach every frame) and the last, the CTC head (29 outputs: tiny, and it decides every
# emitted character) -- the usual first-and-last-layer convention of quantization papers.
DEFAULT_SKIP = ("subsampling.conv1", "head")
COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


# ----------------------------------------------------------------------------------------------- settings
# Every method has a calibrated algorithm (the default) and keeps its data-free one by name, so the two can be
# shown side by side: ``algo=`` in a recipe (``int4:group=64,algo=rtn``).
# int8 gptq's activation rounding unless the recipe says: chosen on dev-clean-2-a's first 100 utterances
DEFAULT_GPTQ_ACTIVATIONS = "per-row"
# sparsegpt's least-squares refit of the kept weights unless the recipe says (prune refit=); chosen there too
REFIT_STEPS = 5
NAIVE = {"int8": "rtn", "int4": "rtn", "ternary": "rtn", "prune": "magnitude", "structured": "norm",
         "svd": "weight", "kmeans": "lloyd"}


def _check_algo(method: str, algo: str, choices: tuple[str, ...]) -> None:
    if algo not in choices:
        raise SettingsError(f"{method} algo must be one of {', '.join(choices)}, got {algo!r}")


@dataclass
class Int8Settings:
    """INT8 weights per output channel, run on int8 kernels that round activations at run time.
    ``algo=rtn``: round to nearest; ``gptq``: GPTQ with clipped per-channel scales. ``activations``
    (:data:`compression.quantize.ACTIVATIONS`): ``reduced``, torch's 7-bit per-call default (rtn's); ``full``,
    8 bits per call where the CPU makes it safe (:func:`compression.quantize.full_range_int8_is_safe`);
    ``per-row``, one 8-bit scale per frame (:class:`compression.quantize.PerRowInt8Linear`)."""

    algo: str = "gptq"
    activations: str | None = None  # default: "reduced" for rtn, DEFAULT_GPTQ_ACTIVATIONS for gptq

    @property
    def runtime_activations(self) -> str:
        if self.activations is not None:
            return self.activations
        return DEFAULT_GPTQ_ACTIVATIONS if self.algo == "gptq" else "reduced"

    def validate(self):
        _check_algo("int8", self.algo, ("gptq", "rtn"))
        if self.activations not in (None, *ACTIVATIONS):
            raise SettingsError(f"int8 activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")


@dataclass
class Int4Settings:
    group: int = 64  # input weights sharing one scale
    algo: str = "gptq"  # gptq (clipped scales + error feedback) | rtn (round to nearest, max|w| / 7)
    act_order: bool = True  # gptq: columns with the largest input energy first

    def validate(self):
        if not 4 <= self.group <= 4096:
            raise SettingsError(f"int4 group must be between 4 and 4096, got {self.group}")
        _check_algo("int4", self.algo, ("gptq", "rtn"))


@dataclass
class TernarySettings:
    algo: str = "gptq"  # gptq (searched alpha + error feedback) | rtn (TWN: threshold 0.7·mean|w|)
    group: int | None = None  # inputs sharing one alpha; None: one per output channel

    def validate(self):
        _check_algo("ternary", self.algo, ("gptq", "rtn"))
        if self.group is not None and not 4 <= self.group <= 4096:
            raise SettingsError(f"ternary group must be between 4 and 4096, got {self.group}")


@dataclass
class PruneSettings:
    sparsity: float = 0.5
    scope: str = "global"  # magnitude only: "global" one threshold over all layers; "layer": each layer alike
    algo: str = "sparsegpt"  # sparsegpt | wanda | magnitude (every layer exactly `sparsity`; wanda in every row)
    pattern: str | None = None  # "N:M": N of every M consecutive weights of a row are zero (2:4); sets sparsity
    alloc: str | None = None  # calibrated only; None: every layer `sparsity`; "owl": per layer by its outliers
                              # (compression.calibrated.owl_sparsities), `sparsity` on average over the weights
    select: str | None = None  # sparsegpt, unstructured: "block" (the default) one saliency threshold over each
                               # block of 128 inputs, as SparseGPT's reference code; "row" the same count per row
    refit: int | None = None  # calibrated: conjugate-gradient steps of least squares on the kept weights after
                              # the mask (compression.calibrated.refit_kept); default 5 for sparsegpt, 0 for wanda

    def validate(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise SettingsError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in ("global", "layer"):
            raise SettingsError(f"prune scope must be 'global' or 'layer', got {self.scope!r}")
        _check_algo("prune", self.algo, ("sparsegpt", "wanda", "magnitude"))
        if self.alloc not in (None, "owl"):
            raise SettingsError(f"prune alloc must be 'owl' (or left out: the same sparsity in every layer), "
                                f"got {self.alloc!r}")
        if self.alloc and (self.algo == "magnitude" or self.pattern is not None):
            raise SettingsError("prune alloc=owl needs a calibrated algo (sparsegpt, wanda) and no N:M pattern")
        if self.select not in (None, "row", "block"):
            raise SettingsError(f"prune select must be 'block' or 'row', got {self.select!r}")
        if self.select and (self.algo != "sparsegpt" or self.pattern is not None):
            raise SettingsError("prune select applies to algo=sparsegpt without an N:M pattern (wanda and N:M "
                                "choose within each row)")
        if self.refit is not None and not (self.algo != "magnitude" and 0 <= self.refit <= 200):
            raise SettingsError(f"prune refit (least-squares steps, 0-200) needs a calibrated algo, got "
                                f"refit={self.refit} with algo={self.algo}")
        if self.pattern is not None:
            n, m = self.n_m
            self.sparsity = n / m

    @property
    def refit_steps(self) -> int:
        return self.refit if self.refit is not None else (REFIT_STEPS if self.algo == "sparsegpt" else 0)

    @property
    def n_m(self) -> tuple[int, int]:
        """(N, M) of the pattern, (0, 0) without one."""
        if self.pattern is None:
            return 0, 0
        n, _, m = str(self.pattern).partition(":")
        try:
            n, m = int(n), int(m)
        except ValueError:
            raise SettingsError(f"prune pattern must look like N:M (e.g. 2:4), got {self.pattern!r}") from None
        if not 0 < n < m <= 64:
            raise SettingsError(f"prune pattern N:M needs 0 < N < M <= 64, got {self.pattern!r}")
        return n, m


@dataclass
class StructuredSettings:
    fraction: float = 0.3  # share of FFN hidden units and of attention heads removed in every block
    heads: bool = True
    ffn: bool = True
    algo: str = "reconstruct"  # reconstruct (FLAP importance + least-squares refit) | norm (weight norms only)

    def validate(self):
        if not 0.0 <= self.fraction < 1.0:
            raise SettingsError(f"structured fraction must be in [0, 1), got {self.fraction}")
        _check_algo("structured", self.algo, ("reconstruct", "norm"))


@dataclass
class SVDSettings:
    rank: int | None = None  # fixed rank for every layer, or
    energy: float | None = None  # keep the smallest rank retaining this share of sum(sigma^2) per layer
    algo: str = "activation"  # activation (SVD-LLM: sigma of W·S, S² the input covariance) | weight (sigma of W)

    def validate(self):
        if (self.rank is None) == (self.energy is None):
            raise SettingsError("svd needs exactly one of rank=N or energy=F")
        if self.rank is not None and self.rank < 1:
            raise SettingsError(f"svd rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise SettingsError(f"svd energy must be in (0, 1], got {self.energy}")
        _check_algo("svd", self.algo, ("activation", "weight"))


@dataclass
class KMeansSettings:
    clusters: int = 16
    iterations: int = 30
    algo: str = "weighted"  # weighted (by the Hessian diagonal, then GPTQ error feedback) | lloyd (plain)
    codebook: str | None = None  # layer (one codebook a layer) | row (one per output row); default: row for weighted
    centroid_bits: int | None = None  # a row codebook's centroids: 8 (a per-row 256-level grid; default) | 16 (fp16)

    @property
    def per_row(self) -> bool:
        return (self.codebook or ("row" if self.algo == "weighted" else "layer")) == "row"

    @property
    def row_centroids(self) -> str:
        """How a row codebook stores its centroids (ROW_CENTROIDS)."""
        return "fp16" if self.centroid_bits == 16 else "uint8"

    def validate(self):
        if self.codebook not in (None, "layer", "row"):
            raise SettingsError(f"kmeans codebook must be 'layer' or 'row', got {self.codebook!r}")
        if self.centroid_bits not in (None, 8, 16):
            raise SettingsError(f"kmeans centroid_bits must be 8 or 16, got {self.centroid_bits}")
        if self.centroid_bits is not None and not self.per_row:
            raise SettingsError("kmeans centroid_bits applies to one codebook per row (codebook=row); a layer's "
                                "single codebook is stored in fp32")
        if not 2 <= self.clusters <= 256:
            raise SettingsError(f"kmeans clusters must be between 2 and 256, got {self.clusters}")
        if self.iterations < 1:
            raise SettingsError(f"kmeans iterations must be at least 1, got {self.iterations}")
        _check_algo("kmeans", self.algo, ("weighted", "lloyd"))


def is_calibrated(settings) -> bool:
    return getattr(settings, "algo", None) not in (None, *NAIVE.values())


SETTINGS = {"int8": Int8Settings, "int4": Int4Settings, "ternary": TernarySettings, "prune": PruneSettings,
            "structured": StructuredSettings, "svd": SVDSettings, "kmeans": KMeansSettings}
# Order in which methods may follow each other: each stage at most once, stages non-decreasing. Later
# stages keep what earlier ones promise (a pruned zero stays zero under a symmetric quantizer, ...);
# the reverse order would undo it (pruning after k-means leaves a codebook value that no weight uses).
STAGE = {"structured": 0, "svd": 1, "prune": 2, "kmeans": 3, "int4": 3, "ternary": 3, "int8": 4}


def make_settings(method: str, **values) -> object:
    if method not in SETTINGS:
        raise SettingsError(f"Unknown compression method {method!r}; choose from {', '.join(SETTINGS)}")
    cls = SETTINGS[method]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise SettingsError(f"{method} has no setting {key!r}; its settings: {', '.join(fields) or 'none'}")
    settings = cls(**values)
    settings.validate()
    return settings


# ----------------------------------------------------------------------------------------------- helpers
class LowRankLinear(nn.Module):
    """W (out, in) ~ up.weight (out, r) @ down.weight (r, in); bias on ``up``."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class Mask(nn.Module):
    """Parametrization: w * mask (pruned weights stay exactly zero, also through fine-tuning)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


# how a row codebook stores its centroids: fp16 (k x 2 bytes a row), or uint8 codes on the row's own grid of 256
# levels from its lowest to its highest centroid (k bytes + the two ends in fp16: 20 instead of 32 bytes a row at
# k = 16; the grid step is about 1/16 of the spacing of 16 clusters, so its rounding is small beside theirs)
ROW_CENTROIDS = ("fp16", "uint8")


def centroid_grid(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, k) centroids -> each row's grid ends (low, high), both (out,) and exactly fp16 values. The ends, not
    the step, are stored: a step below fp16's normal range (a row spanning < 0.016) would lose its precision."""
    return codebook.amin(1).half().float(), codebook.amax(1).half().float()


def _grid_step(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return ((high - low) / 255)[:, None]


def grid_codes(codebook: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(out, k) centroids -> their codes 0-255 on the rows' grids (a flat row: every code 0)."""
    step = _grid_step(low, high)
    codes = ((codebook - low[:, None]) / step.clamp_min(1e-30)).round_().clamp_(0, 255)
    return torch.where(step > 0, codes, 0.0)


def grid_values(codes: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`grid_codes`: the centroids the codes stand for, as the artifact decodes them."""
    return low[:, None] + codes.float() * _grid_step(low, high)


def round_row_centroids(codebook: torch.Tensor, stored: str) -> torch.Tensor:
    """(out, k) centroids -> the values the artifact will hold (``stored``: one of ROW_CENTROIDS)."""
    if stored not in ROW_CENTROIDS:
        raise ValueError(f"row centroids are stored as one of {ROW_CENTROIDS}, not {stored!r}")
    if stored == "fp16":
        return codebook.half().float()
    low, high = centroid_grid(codebook)
    return grid_values(grid_codes(codebook, low, high), low, high)


class Clustered(nn.Module):
    """Parametrization: w = codebook[indices] (masked entries 0); codebook (k,) for the layer or (out, k), one per
    output row (``row_centroids``: how the artifact stores those, ROW_CENTROIDS). The codebook is trainable: each
    centroid receives the sum of its weights' gradients, the shared-gradient update of Deep Compression."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None,
                 row_centroids: str = "uint8"):
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.row_centroids = row_centroids
        self.register_buffer("indices", indices)
        self.register_buffer("mask", mask if mask is not None else torch.ones_like(indices, dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.codebook.dim() == 2:  # one codebook per output row (out, k), rounded as stored: trained through it
            rounded = round_row_centroids(self.codebook.detach(), self.row_centroids)
            codebook = rounded + (self.codebook - self.codebook.detach())  # exactly the stored values, in value
            rows = self.indices.reshape(self.indices.shape[0], -1)
            return codebook.gather(1, rows).reshape(self.indices.shape) * self.mask
        return self.codebook[self.indices] * self.mask


def target_layers(model: nn.Module, skip=DEFAULT_SKIP, only=None) -> list[tuple[str, nn.Module]]:
    """Every Linear and (non-depthwise) convolution outside the ``skip`` name patterns (fnmatch), in module
    order. Convolutions get the same weight encodings, on their weight viewed as (out, in x kernel); they run
    as float convolutions after decoding (torch has no dynamic int8 convolution kernel)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, COMPRESSIBLE) and getattr(m, "groups", 1) == 1
            and not any(fnmatch.fnmatch(name, p) for p in skip)
            and (only is None or any(fnmatch.fnmatch(name, p) for p in only))]


def constraints(linear: nn.Linear) -> list[nn.Module]:
    if not parametrize.is_parametrized(linear, "weight"):
        return []
    return list(linear.parametrizations.weight)


def current_mask(linear: nn.Linear) -> torch.Tensor | None:
    for p in constraints(linear):
        if isinstance(p, (Mask, Clustered)):
            return p.mask
    return None


def _effective(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.detach().float()


# ----------------------------------------------------------------------------------------------- methods
def apply_quant(model: nn.Module, kind: str, settings, layers, stats=None) -> nn.Module:
    activations = settings.runtime_activations if kind == "int8" else "reduced"
    if settings.algo == "gptq":
        # int8 over a grid already chosen (k-means, int4, ternary) only re-encodes those few values: round them
        gridded = [(n, m) for n, m in layers if any(isinstance(p, (Clustered, FakeQuant)) for p in constraints(m))]
        calibrated.gptq([x for x in layers if x not in gridded], stats, kind, getattr(settings, "group", 64),
                        getattr(settings, "act_order", True), activations=activations)
        layers = gridded
    for _, linear in layers:
        parametrize.register_parametrization(linear, "weight", FakeQuant(kind, getattr(settings, "group", 64),
                                                                         activations=activations))
    return model


def apply_prune(model: nn.Module, s: PruneSettings, layers, stats=None) -> nn.Module:
    n, m = s.n_m
    if s.algo != "magnitude":
        calibrated.prune(layers, stats, s.algo, s.sparsity, n, m, owl=s.alloc == "owl",
                         per_row=s.select == "row", refit=s.refit_steps)
        return model
    weights = [_effective(lin).abs() for _, lin in layers]
    if n:  # N:M by magnitude, row by row
        for (_, linear), w in zip(layers, weights):
            keep = row_mask(w.reshape(w.shape[0], -1), s.sparsity, n, m)
            parametrize.register_parametrization(linear, "weight", Mask(keep.reshape(w.shape)))
        return model
    if s.scope == "global":
        flat = torch.cat([w.reshape(-1) for w in weights])
        k = int(round(s.sparsity * flat.numel()))
        threshold = kth_smallest(flat, k) if k > 0 else torch.tensor(-1.0)
        thresholds = [threshold] * len(weights)
    else:
        thresholds = []
        for w in weights:
            k = int(round(s.sparsity * w.numel()))
            thresholds.append(kth_smallest(w.reshape(-1), k) if k > 0 else torch.tensor(-1.0))
    for (_, linear), w, t in zip(layers, weights, thresholds):
        parametrize.register_parametrization(linear, "weight", Mask(w > t))
    return model


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """``values.kthvalue(k).values`` (1-D, 1 <= k <= n) by numpy's partition (introselect, vectorised): the
    global magnitude threshold over the shipped model's 20 M weights took 1.0 s of a 3.1 s naive combined build
    with torch's kthvalue, and the build fell to 2.3 s with this (on 20 M random values the two differ less,
    1.3-3.7x)."""
    return torch.tensor(np.partition(values.detach().float().contiguous().numpy(), k - 1)[k - 1])


def sort_order(values: torch.Tensor) -> torch.Tensor:
    """The permutation (int64) that sorts ``values`` (1-D float), as ``values.argsort()``, computed by numpy:
    its argsort uses the CPU's vector sorting network (x86-simd-sort): 21 ms against torch's 87 ms on a million
    float32 values on an AVX-512 host, and the sort is most of a k-means build. Ties may come in another order;
    k-means cannot tell (equal values always share a cluster)."""
    return torch.from_numpy(np.argsort(values.detach().float().contiguous().numpy()))


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30, weights: torch.Tensor | None = None,
              perm: torch.Tensor | None = None, assign: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact Lloyd's k-means in one dimension: (n,) -> centroids (k,) sorted, indices (n,).

    ``weights`` (n,), optional: each value counts that much in its centroid's mean (SqueezeLLM's
    sensitivity-weighted k-means: a weight whose input carries more energy pulls its centroid harder).
    ``perm`` (n,), optional: the permutation that sorts ``values``, when already known (the sort is most of the
    time: a caller that clusters the same weights again, at another k, keeps it). ``assign`` False: the centroids
    only (indices None), for a caller that assigns the weights itself.

    Written out rather than sklearn.cluster.KMeans because 1-D allows an exact shortcut: after one sort,
    every cluster is a contiguous run of the sorted values, so an iteration is a binary search of the k-1
    midpoints plus prefix-sum means (O(k log n)); a 600k-weight layer takes milliseconds, not seconds.
    Linear initialisation over [min, max], which Han et al. (Deep Compression) found best for accuracy.
    """
    values = values.detach().float().reshape(-1)
    perm = sort_order(values) if perm is None else perm
    sorted_values = values.take(perm)  # take: several times faster than values[perm] on a CPU
    n = sorted_values.numel()
    # prefix sums in float64 (a layer's million terms would lose the means' last digits), written straight into
    # one buffer: no float64 copy of the values and no concatenation (each a pass over a million entries)
    prefix = torch.zeros(n + 1, dtype=torch.float64)
    if weights is None:  # every weight counts once: a run's mass is its length
        prefix_w = None
        torch.cumsum(sorted_values, 0, dtype=torch.float64, out=prefix[1:])
    else:
        mass = weights.detach().reshape(-1).float().take(perm).clamp_min_(0)
        prefix_w = torch.zeros(n + 1, dtype=torch.float64)
        torch.cumsum(mass, 0, dtype=torch.float64, out=prefix_w[1:])
        torch.cumsum(mass.mul_(sorted_values), 0, dtype=torch.float64, out=prefix[1:])
    centroids = torch.linspace(float(sorted_values[0]), float(sorted_values[-1]), k, dtype=torch.float64)
    edge_low, edge_high = torch.zeros(1, dtype=torch.long), torch.tensor([n])
    for _ in range(iterations):
        bounds = torch.searchsorted(sorted_values, ((centroids[1:] + centroids[:-1]) / 2).float())
        starts, ends = torch.cat([edge_low, bounds]), torch.cat([bounds, edge_high])
        counts = (ends - starts).double() if prefix_w is None else prefix_w[ends] - prefix_w[starts]
        new = torch.where(counts > 0, (prefix[ends] - prefix[starts]) / counts.clamp_min(1e-30), centroids)
        converged = torch.equal(new, centroids)
        centroids = new
        if converged:
            break
    centroids = centroids.float().sort().values
    if not assign:
        return centroids, None
    # torch.bucketize(values, mids) without its binary search per weight: in sorted order the clusters are
    # runs, cut where a value first exceeds a midpoint (right=True: a value on a midpoint goes below, as there).
    # The run numbers are scattered back in int32 (half the bytes of int64: 1.5-2x faster on a CPU).
    runs = torch.searchsorted(sorted_values, (centroids[1:] + centroids[:-1]) / 2, right=True)
    starts = torch.zeros(n + 1, dtype=torch.int32).index_add_(0, runs, torch.ones_like(runs, dtype=torch.int32))
    indices = torch.empty(n, dtype=torch.int32).scatter_(0, perm, starts[:-1].cumsum(0, dtype=torch.int32))
    return centroids, indices.long()


def kmeans_rows(w: torch.Tensor, k: int, iterations: int = 30, weights: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, stored: str = "uint8") -> torch.Tensor:
    """Exact 1-D Lloyd's k-means of every row on its own: (out, in) -> centroids (out, k), each row's sorted and
    rounded as the artifact stores them (``stored``: ROW_CENTROIDS).

    Per row, SqueezeLLM's per-channel lookup tables: a row's weights span their own range, so its levels sit
    where its weights are. The same shortcut as :func:`kmeans_1d`, batched over rows: one sort along each row,
    then each iteration is a binary search of the k-1 midpoints in every row and prefix-sum means.
    ``weights`` (out, in): how much each weight pulls its centroid; ``keep`` (out, in) bool: pruned entries
    (False) pull nothing and do not set the range.
    """
    w = w.detach().float()
    mass = torch.ones_like(w) if weights is None else weights.detach().float().clamp_min(0).expand_as(w).clone()
    if keep is not None:
        mass.mul_(keep)
    sorted_values, perm = torch.sort(w, dim=1)
    mass = mass.gather(1, perm)
    out, n = w.shape
    prefix_w = torch.zeros(out, n + 1, dtype=torch.float64)
    prefix = torch.zeros(out, n + 1, dtype=torch.float64)
    torch.cumsum(mass, 1, dtype=torch.float64, out=prefix_w[:, 1:])
    torch.cumsum(mass.mul_(sorted_values), 1, dtype=torch.float64, out=prefix[:, 1:])
    kept = keep.gather(1, perm) if keep is not None else None
    low = sorted_values.masked_fill(~kept, float("inf")).amin(1) if kept is not None else sorted_values[:, 0]
    high = sorted_values.masked_fill(~kept, float("-inf")).amax(1) if kept is not None else sorted_values[:, -1]
    low, high = torch.where(torch.isfinite(low), low, 0.0), torch.where(torch.isfinite(high), high, 0.0)
    steps = torch.linspace(0, 1, k, dtype=torch.float64)
    centroids = low.double()[:, None] + (high - low).double()[:, None] * steps  # (out, k), linear initialisation
    edge_low, edge_high = torch.zeros(out, 1, dtype=torch.long), torch.full((out, 1), n)
    for _ in range(iterations):
        bounds = torch.searchsorted(sorted_values, ((centroids[:, 1:] + centroids[:, :-1]) / 2).float())
        starts, ends = torch.cat([edge_low, bounds], 1), torch.cat([bounds, edge_high], 1)
        counts = prefix_w.gather(1, ends) - prefix_w.gather(1, starts)
        means = (prefix.gather(1, ends) - prefix.gather(1, starts)) / counts.clamp_min(1e-30)
        new = torch.where(counts > 0, means, centroids)
        converged = torch.equal(new, centroids)
        centroids = new
        if converged:
            break
    return round_row_centroids(centroids.float(), stored).sort(dim=1).values


def nearest_in_rows(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(out, in) weights, (out, k) sorted centroids -> (out, in) int64 index of each weight's nearest centroid."""
    mids = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mids, w.float().contiguous())


def apply_kmeans(model: nn.Module, s: KMeansSettings, layers, stats=None) -> nn.Module:
    if s.algo == "weighted":
        calibrated.weighted_kmeans(layers, stats, s.clusters, s.iterations, per_row=s.per_row,
                                   row_centroids=s.row_centroids)
        return model
    if s.per_row:
        for _, linear in layers:
            w, mask = _effective(linear), current_mask(linear)
            rows = w.reshape(w.shape[0], -1)
            keep = None if mask is None else mask.reshape(rows.shape)
            centroids = kmeans_rows(rows, s.clusters, s.iterations, keep=keep, stored=s.row_centroids)
            indices = nearest_in_rows(rows, centroids).reshape(w.shape)
            parametrize.register_parametrization(linear, "weight", Clustered(centroids, indices, mask,
                                                                             s.row_centroids), unsafe=True)
        return model
    for name, linear in layers:
        w = _effective(linear)
        mask = current_mask(linear)
        chosen = w[mask] if mask is not None else w.reshape(-1)
        if chosen.numel() == 0:  # pruned away entirely (e.g. an all-zero identity projection): nothing to cluster
            continue
        kept = calibrated.matching_stats(stats, name, linear)  # with statistics at hand, the sort is kept there
        centroids, idx = kmeans_1d(chosen, s.clusters, s.iterations,
                                   perm=None if kept is None else calibrated.kept_sort(kept, name, chosen))
        indices = torch.zeros(w.shape, dtype=torch.long)
        if mask is not None:
            indices[mask] = idx
        else:
            indices = idx.reshape(w.shape)
        parametrize.register_parametrization(linear, "weight", Clustered(centroids, indices, mask), unsafe=True)
    return model


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def svd_rank(weight: torch.Tensor, s: SVDSettings,
             factors=None) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rank the settings keep, U, Σ, Vᵀ) of ``weight``; ``factors``: its (U, Σ, Vᵀ) when already known."""
    u, sigma, vh = factors if factors is not None else torch.linalg.svd(weight.float(), full_matrices=False)
    if s.rank is not None:
        rank = s.rank
    else:
        energy = torch.cumsum(sigma ** 2, 0) / (sigma ** 2).sum()
        rank = int((energy < s.energy - 1e-7).sum().item()) + 1
    return min(rank, sigma.numel()), u, sigma, vh


def apply_svd(model: nn.Module, s: SVDSettings, layers, stats=None) -> nn.Module:
    layers = [(name, m) for name, m in layers if isinstance(m, nn.Linear)]
    if s.rank is not None:
        for name, linear in layers:
            if s.rank > min(linear.weight.shape):
                raise SettingsError(f"svd rank {s.rank} is larger than layer {name} allows "
                                    f"({tuple(linear.weight.shape)})")
    for name, linear in layers:
        out_f, in_f = linear.weight.shape
        if s.algo == "activation":
            factors = calibrated.activation_svd(linear, calibrated.layer_stats(stats, name, linear), s.energy, s.rank,
                                                name)
        else:
            factors = _weight_svd(linear, s, calibrated.matching_stats(stats, name, linear), name)
        if factors is None:
            continue  # factorising would not save parameters: keep the layer whole
        rank, up, down, bias = factors
        low = LowRankLinear(in_f, rank, out_f, bias=linear.bias is not None)
        with torch.no_grad():
            low.down.weight.copy_(down)
            low.up.weight.copy_(up)
            if linear.bias is not None:
                low.up.bias.copy_(bias)
        _set_child(model, name, low)
    return model


def _weight_svd(linear: nn.Linear, s: SVDSettings, layer_stats=None, name: str = ""):
    """Truncated SVD of the weight alone: (rank, up, down, bias) or None when it would not save parameters.
    With the layer's calibration statistics at hand (``layer_stats``, at its current width:
    :func:`calibrated.matching_stats`; the studio, the benchmark), the SVD is kept with them, as
    the calibrated algorithm's is: it does not depend on the energy knob, so a knob change or a sweep factorises
    each layer once (the statistics are not otherwise used: this is still the data-free algorithm)."""
    out_f, in_f = linear.weight.shape
    w = _effective(linear).float()
    factors = None
    if layer_stats is not None:
        factors = calibrated.kept_for_layer(layer_stats, ("weight-svd", name), calibrated.weight_digest(w),
                                            lambda: torch.linalg.svd(w, full_matrices=False))
    rank, u, sigma, vh = svd_rank(w, s, factors)
    if rank * (in_f + out_f) >= in_f * out_f:
        return None
    root = sigma[:rank].sqrt()
    bias = linear.bias.detach() if linear.bias is not None else None
    return rank, u[:, :rank] * root[None, :], root[:, None] * vh[:rank], bias


def apply_structured(model: ConformerCTC, s: StructuredSettings, stats=None) -> ConformerCTC:
    """Remove the same share of FFN hidden units and attention heads from every block.

    ``algo=norm``: a unit's importance is ||row of linear1|| x ||column of linear2|| (its input and output
    weights' L2 norms); a head's is ||its q,k,v rows|| x ||its out_proj columns||. ``algo=reconstruct``: FLAP's
    activation fluctuation, then a least-squares refit of the layer after the removed units (see
    :mod:`compression.calibrated`). The lowest go. The model keeps one width per kind, so the result is a
    plain, smaller ConformerCTC with a smaller config.
    """
    cfg = model.cfg
    keep_units = max(1, round(cfg.ffn_dim * (1 - s.fraction))) if s.ffn else cfg.ffn_dim
    keep_heads = max(1, round(cfg.n_heads * (1 - s.fraction))) if s.heads else cfg.n_heads
    head_dim = cfg.inner_attn_dim // cfg.n_heads
    if s.algo == "reconstruct":
        calibrated.structured_reconstruct(model, keep_units, keep_heads, stats, s.ffn, s.heads)
    else:
        _structured_by_norm(model, keep_units, keep_heads, head_dim, s)
    model.cfg = dataclasses.replace(cfg, ffn_dim=keep_units, n_heads=keep_heads, attn_dim=keep_heads * head_dim)
    return model


def _structured_by_norm(model: ConformerCTC, keep_units: int, keep_heads: int, head_dim: int, s) -> None:
    cfg = model.cfg
    with torch.no_grad():
        for block in model.blocks:
            for ffn in (f for f in (block.ffn1, block.ffn2) if f is not None):  # plain blocks have no ffn1
                w1, w2 = ffn.linear1.weight, ffn.linear2.weight
                score = w1.norm(dim=1) * w2.norm(dim=0)
                keep = score.topk(keep_units).indices.sort().values
                ffn.linear1 = _rows(ffn.linear1, keep)
                ffn.linear2 = _cols(ffn.linear2, keep)
            a = block.attn
            per_head = lambda w: w.reshape(cfg.n_heads, head_dim, -1).pow(2).sum(dim=(1, 2))  # noqa: E731
            score = (per_head(a.q_proj.weight) + per_head(a.k_proj.weight) + per_head(a.v_proj.weight)).sqrt() \
                * a.out_proj.weight.reshape(-1, cfg.n_heads, head_dim).pow(2).sum(dim=(0, 2)).sqrt()
            heads = score.topk(keep_heads).indices.sort().values
            keep = (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
            a.q_proj, a.k_proj, a.v_proj = (_rows(p, keep) for p in (a.q_proj, a.k_proj, a.v_proj))
            a.out_proj = _cols(a.out_proj, keep)
            a.n_heads = keep_heads


def _rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None)
    new.weight.data.copy_(linear.weight.data[keep])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[keep])
    return new


def _cols(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    new.weight.data.copy_(linear.weight.data[:, keep])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data)
    return new


def apply_method(model: nn.Module, method: str, settings, skip=DEFAULT_SKIP, only=None, stats=None) -> nn.Module:
    """Apply one method to the layers outside ``skip`` (and inside ``only``, when given: name patterns);
    structured pruning works block-wise on every block. ``stats``: the model's CalibrationStats, needed by the
    calibrated algorithms (:func:`is_calibrated`)."""
    if method == "structured":
        if any(isinstance(m, LowRankLinear) for m in model.modules()) or \
                any(constraints(lin) for _, lin in target_layers(model, ())):
            raise SettingsError("structured pruning must come first in a recipe")
        return apply_structured(model, settings, stats)
    layers = target_layers(model, skip, only)
    if not layers:
        raise SettingsError(f"{method}: no layer matches (skip={list(skip)}, only={only})")
    if method in ("int8", "int4", "ternary"):
        return apply_quant(model, method, settings, layers, stats)
    return {"prune": apply_prune, "kmeans": apply_kmeans, "svd": apply_svd}[method](model, settings, layers, stats)
