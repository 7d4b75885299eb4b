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

import torch
from torch import nn
from torch.nn.utils import parametrize

from asr_core.errors import SettingsError
from asr_core.model import ConformerCTC

from .quantize import FakeQuant

# Layers left in higher precision (fp16) unless the recipe says otherwise: the first layer (it sees raw
# features; its errors reach every frame) and the last, the CTC head (29 outputs: tiny, and it decides every
# emitted character) -- the usual first-and-last-layer convention of quantization papers.
DEFAULT_SKIP = ("subsampling.conv1", "head")
COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Int8Settings:
    """INT8 weights per output channel, run on torch's int8 kernels (dynamic activation quantization)."""

    def validate(self):
        pass


@dataclass
class Int4Settings:
    group: int = 64  # input weights sharing one scale

    def validate(self):
        if not 4 <= self.group <= 4096:
            raise SettingsError(f"int4 group must be between 4 and 4096, got {self.group}")


@dataclass
class TernarySettings:
    def validate(self):
        pass


@dataclass
class PruneSettings:
    sparsity: float = 0.5
    scope: str = "global"  # "global": one magnitude threshold over all layers; "layer": each layer alike

    def validate(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise SettingsError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in ("global", "layer"):
            raise SettingsError(f"prune scope must be 'global' or 'layer', got {self.scope!r}")


@dataclass
class StructuredSettings:
    fraction: float = 0.3  # share of FFN hidden units and of attention heads removed in every block
    heads: bool = True
    ffn: bool = True

    def validate(self):
        if not 0.0 <= self.fraction < 1.0:
            raise SettingsError(f"structured fraction must be in [0, 1), got {self.fraction}")


@dataclass
class SVDSettings:
    rank: int | None = None  # fixed rank for every layer, or
    energy: float | None = None  # keep the smallest rank retaining this share of sum(sigma^2) per layer

    def validate(self):
        if (self.rank is None) == (self.energy is None):
            raise SettingsError("svd needs exactly one of rank=N or energy=F")
        if self.rank is not None and self.rank < 1:
            raise SettingsError(f"svd rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise SettingsError(f"svd energy must be in (0, 1], got {self.energy}")


@dataclass
class KMeansSettings:
    clusters: int = 16
    iterations: int = 30

    def validate(self):
        if not 2 <= self.clusters <= 256:
            raise SettingsError(f"kmeans clusters must be between 2 and 256, got {self.clusters}")
        if self.iterations < 1:
            raise SettingsError(f"kmeans iterations must be at least 1, got {self.iterations}")


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


class Clustered(nn.Module):
    """Parametrization: w = codebook[indices] (masked entries 0). The codebook is trainable: each centroid
    receives the sum of its weights' gradients, the shared-gradient update of Deep Compression."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None):
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("indices", indices)
        self.register_buffer("mask", mask if mask is not None else torch.ones_like(indices, dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.indices] * self.mask


def target_linears(model: nn.Module, skip=DEFAULT_SKIP, only=None) -> list[tuple[str, nn.Module]]:
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
def apply_quant(model: nn.Module, kind: str, settings, layers) -> nn.Module:
    for _, linear in layers:
        parametrize.register_parametrization(linear, "weight", FakeQuant(kind, getattr(settings, "group", 64)))
    return model


def apply_prune(model: nn.Module, s: PruneSettings, layers) -> nn.Module:
    weights = [_effective(lin).abs() for _, lin in layers]
    if s.scope == "global":
        flat = torch.cat([w.reshape(-1) for w in weights])
        k = int(round(s.sparsity * flat.numel()))
        threshold = flat.kthvalue(k).values if k > 0 else torch.tensor(-1.0)
        thresholds = [threshold] * len(weights)
    else:
        thresholds = []
        for w in weights:
            k = int(round(s.sparsity * w.numel()))
            thresholds.append(w.reshape(-1).kthvalue(k).values if k > 0 else torch.tensor(-1.0))
    for (_, linear), w, t in zip(layers, weights, thresholds):
        parametrize.register_parametrization(linear, "weight", Mask(w > t))
    return model


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Lloyd's k-means in one dimension: (n,) -> centroids (k,) sorted, indices (n,).

    Written out rather than sklearn.cluster.KMeans because 1-D allows an exact shortcut: after one sort,
    every cluster is a contiguous run of the sorted values, so an iteration is a binary search of the k-1
    midpoints plus prefix-sum means (O(k log n)); a 600k-weight layer takes milliseconds, not seconds.
    Linear initialisation over [min, max], which Han et al. (Deep Compression) found best for accuracy.
    """
    values = values.detach().float().reshape(-1)
    ordered = values.sort().values.double()
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), ordered.cumsum(0)])
    centroids = torch.linspace(float(ordered[0]), float(ordered[-1]), k, dtype=torch.float64)
    for _ in range(iterations):
        bounds = torch.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), bounds])
        ends = torch.cat([bounds, torch.tensor([ordered.numel()])])
        counts = (ends - starts).double()
        new = torch.where(counts > 0, (prefix[ends] - prefix[starts]) / counts.clamp_min(1), centroids)
        converged = torch.equal(new, centroids)
        centroids = new
        if converged:
            break
    centroids = centroids.float().sort().values
    return centroids, torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)


def apply_kmeans(model: nn.Module, s: KMeansSettings, layers) -> nn.Module:
    for _, linear in layers:
        w = _effective(linear)
        mask = current_mask(linear)
        chosen = w[mask] if mask is not None else w.reshape(-1)
        if chosen.numel() == 0:  # pruned away entirely (e.g. an all-zero identity projection): nothing to cluster
            continue
        centroids, idx = kmeans_1d(chosen, s.clusters, s.iterations)
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


def svd_rank(weight: torch.Tensor, s: SVDSettings) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    if s.rank is not None:
        rank = s.rank
    else:
        energy = torch.cumsum(sigma ** 2, 0) / (sigma ** 2).sum()
        rank = int((energy < s.energy - 1e-7).sum().item()) + 1
    return min(rank, sigma.numel()), u, sigma, vh


def apply_svd(model: nn.Module, s: SVDSettings, layers) -> nn.Module:
    layers = [(name, m) for name, m in layers if isinstance(m, nn.Linear)]
    if s.rank is not None:
        for name, linear in layers:
            if s.rank > min(linear.weight.shape):
                raise SettingsError(f"svd rank {s.rank} is larger than layer {name} allows "
                                    f"({tuple(linear.weight.shape)})")
    for name, linear in layers:
        out_f, in_f = linear.weight.shape
        rank, u, sigma, vh = svd_rank(_effective(linear), s)
        if rank * (in_f + out_f) >= in_f * out_f:
            continue  # factorising would not save parameters: keep the layer whole
        root = sigma[:rank].sqrt()
        low = LowRankLinear(in_f, rank, out_f, bias=linear.bias is not None)
        with torch.no_grad():
            low.down.weight.copy_(root[:, None] * vh[:rank])
            low.up.weight.copy_(u[:, :rank] * root[None, :])
            if linear.bias is not None:
                low.up.bias.copy_(linear.bias)
        _set_child(model, name, low)
    return model


def apply_structured(model: ConformerCTC, s: StructuredSettings, layers) -> ConformerCTC:
    """Remove the same share of FFN hidden units and attention heads from every block.

    Criterion: a unit's importance is ||row of linear1|| x ||column of linear2|| (its input and output
    weights' L2 norms); a head's is ||its q,k,v rows|| x ||its out_proj columns||. The lowest go. The model
    keeps one width per kind, so the result is a plain, smaller ConformerCTC with a smaller config.
    """
    cfg = model.cfg
    keep_units = max(1, round(cfg.ffn_dim * (1 - s.fraction))) if s.ffn else cfg.ffn_dim
    keep_heads = max(1, round(cfg.n_heads * (1 - s.fraction))) if s.heads else cfg.n_heads
    head_dim = cfg.inner_attn_dim // cfg.n_heads
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
    model.cfg = dataclasses.replace(cfg, ffn_dim=keep_units, n_heads=keep_heads, attn_dim=keep_heads * head_dim)
    return model


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


def apply_method(model: nn.Module, method: str, settings, skip=DEFAULT_SKIP, only=None) -> nn.Module:
    """Apply one method to the layers outside ``skip`` (and inside ``only``, when given: name patterns);
    structured pruning works block-wise on every block."""
    if method == "structured":
        if any(isinstance(m, LowRankLinear) for m in model.modules()) or \
                any(constraints(lin) for _, lin in target_linears(model, ())):
            raise SettingsError("structured pruning must come first in a recipe")
        return apply_structured(model, settings, None)
    layers = target_linears(model, skip, only)
    if not layers:
        raise SettingsError(f"{method}: no layer matches (skip={list(skip)}, only={only})")
    if method in ("int8", "int4", "ternary"):
        return apply_quant(model, method, settings, layers)
    return {"prune": apply_prune, "kmeans": apply_kmeans, "svd": apply_svd}[method](model, settings, layers)
