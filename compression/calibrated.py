"""The calibrated algorithm of each method: the same encodings as the data-free ones, chosen on real inputs.

Each function takes the layers to transform, the :class:`~compression.calibration.CalibrationStats` of the
model they belong to, and the method's settings; it registers the same parametrizations as its data-free twin
in :mod:`compression.methods` (a ``Mask``, a ``Clustered`` codebook, a ``FakeQuant`` with the scales it chose),
so the artifact format, the loader and recovery fine-tuning need nothing new.

- int4 / int8 / ternary, ``algo=gptq``: scales with a clipping search, then GPTQ's column sweep.
- kmeans, ``algo=weighted``: k-means weighted by the Hessian diagonal (SqueezeLLM), then GPTQ's sweep to the
  nearest centroid (error feedback).
- prune, ``algo=wanda`` (|W|·‖X_j‖ per row) and ``algo=sparsegpt`` (OBS mask and update), N:M patterns too.
- svd, ``algo=activation``: SVD-LLM's whitening by the Cholesky factor of the input covariance.
- every algorithm then corrects the bias for the shift of the output mean: b -= (Ŵ − W)·E[x] (Nagel et al.).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils import parametrize

from asr_core.errors import SettingsError

from .calibration import CalibrationStats, LayerStats, cholesky_dampened, dampened
from .obs import (CodebookRounder, GridRounder, RowCodebookRounder, SparseGPTChooser, SweepJob, layer_factor,
                  row_mask, sweep_layers, sweep_order)
from .quantize import GRID, FakeQuant, grouped, element_scales

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # shares of max|w| tried as the clipping range (int4, int8)
TERNARY_GRID = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.6)  # multiples of mean|w| tried as alpha


def layer_stats(stats: CalibrationStats | None, name: str, module: nn.Module) -> LayerStats:
    """The statistics of layer ``name``, checked against its current width."""
    if stats is None:
        raise SettingsError(f"{name}: a calibrated algorithm needs calibration statistics (give --calib, or "
                            "algo=the data-free one)")
    s = matching_stats(stats, name, module)
    if s is None:
        raise SettingsError(f"{name}: no calibration statistics for this layer as it is now (width "
                            f"{module.weight.reshape(module.weight.shape[0], -1).shape[1]}); re-collect them on the "
                            "model after the earlier steps")
    return s


def matching_stats(stats: CalibrationStats | None, name: str, module: nn.Module) -> LayerStats | None:
    """Layer ``name``'s statistics when there are some and they were collected at its current width, else None."""
    s = stats.get(name) if stats is not None else None
    width = module.weight.reshape(module.weight.shape[0], -1).shape[1]
    return s if s is not None and s.gram.shape[0] == width else None


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with now (after earlier constraints), as (out, in x kernel)."""
    return module.weight.detach().float().reshape(module.weight.shape[0], -1)


def current_keep(module: nn.Module) -> torch.Tensor | None:
    from .methods import current_mask

    mask = current_mask(module)
    return None if mask is None else mask.reshape(mask.shape[0], -1)


def set_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Write ``value`` (out, in x kernel) as the latent weight under any existing parametrizations (they keep
    it: a mask multiplies zeros that are already zero)."""
    target = module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") \
        else module.weight
    with torch.no_grad():
        target.copy_(value.reshape(target.shape))


def correct_bias(module: nn.Module, before: torch.Tensor, after: torch.Tensor, s: LayerStats) -> None:
    """b -= (Ŵ − W)·E[x]: the output mean on calibration data stays what it was (no bias, nothing to do)."""
    if getattr(module, "bias", None) is None:
        return
    with torch.no_grad():
        module.bias -= ((after - before) @ s.mean).to(module.bias.dtype)


# ----------------------------------------------------------------------------------------------- quantization
def _grid_error(w: torch.Tensor, scales_full: torch.Tensor, kind: str, hdiag: torch.Tensor) -> torch.Tensor:
    low, high = GRID[kind]
    q = torch.round(w / scales_full).clamp(low, high) * scales_full
    return (w - q) ** 2 * hdiag[None, :]


def search_scales(w: torch.Tensor, hdiag: torch.Tensor, kind: str, group: int) -> torch.Tensor:
    """Stored scales -- (out, groups) for int4, (out,) for int8/ternary -- minimising Σ h_jj (w − q(w))², the
    output error as the diagonal of H sees it, over a grid of clipping ranges."""
    width = w.shape[1]
    if kind == "ternary" and group:
        base, grid = grouped(w.abs(), group).sum(2) / grouped(torch.ones_like(w), group).sum(2), TERNARY_GRID
    elif kind == "ternary":
        base, grid = w.abs().mean(dim=1), TERNARY_GRID
    elif kind == "int4":
        base, grid = grouped(w.abs(), group).amax(2) / 7, CLIP_GRID
    else:
        base, grid = w.abs().amax(dim=1) / 127, CLIP_GRID
    best, best_err = None, None
    for share in grid:
        scales = (base * share).clamp_min(1e-6).half().float()
        err = _grid_error(w, element_scales(scales, kind, group, width), kind, hdiag)
        err = _per_scale(err, kind, group)
        if best is None:
            best, best_err = scales, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scales, best), torch.minimum(err, best_err)
    return best


def _per_scale(err: torch.Tensor, kind: str, group: int | None) -> torch.Tensor:
    """Per-weight errors (out, in) summed per stored scale: per row, or per group of inputs."""
    return err.sum(1) if kind == "int8" or not group else grouped(err, group).sum(2)


def gptq(layers, stats: CalibrationStats, kind: str, group: int = 64, act_order: bool = True,
         activations: str = "reduced") -> None:
    """GPTQ to ``kind``'s grid with searched scales (static groups, so act-order keeps contiguous groups),
    keeping an earlier pruning mask's zeros, then bias correction; registers FakeQuant(kind, scales)."""
    for same_shape in by_shape(layers):
        prepared = []
        for name, module in same_shape:
            s = layer_stats(stats, name, module)
            w = effective_weight(module)
            h = s.hessian
            scales = search_scales(w, h.diagonal(), kind, group)
            order = sweep_order(h, act_order)
            rounder = GridRounder(element_scales(scales, kind, group, w.shape[1]), *GRID[kind], order,
                                  current_keep(module))
            prepared.append(((module, s, w, scales), SweepJob(w, order, layer_factor(s, order), rounder)))
        for (module, s, w, scales), (q, _) in zip((p for p, _ in prepared), sweep_layers([j for _, j in prepared])):
            correct_bias(module, w, q, s)
            set_weight(module, q)
            parametrize.register_parametrization(module, "weight", FakeQuant(kind, group, scales, activations))


def by_shape(layers) -> list[list[tuple[str, nn.Module]]]:
    """``layers`` grouped by weight shape (in order within a group): each group is swept side by side
    (:func:`compression.obs.sweep_layers`), one group's working copies in memory at a time."""
    groups: dict[tuple, list] = {}
    for name, module in layers:
        groups.setdefault(tuple(module.weight.shape), []).append((name, module))
    return list(groups.values())


# ----------------------------------------------------------------------------------------------- k-means
def weighted_kmeans(layers, stats: CalibrationStats, clusters: int, iterations: int, per_row: bool = False,
                    row_centroids: str = "uint8") -> None:
    """Per layer (or, ``per_row``, per output row: SqueezeLLM's per-channel tables): k-means of the weights,
    each weighted by its input's energy H_jj; then GPTQ's sweep rounding each column to the nearest centroid;
    then bias correction. Registers Clustered (``row_centroids``: how a row codebook is stored)."""
    from .methods import Clustered, kmeans_1d, kmeans_rows

    for same_shape in by_shape(layers):
        prepared = []
        for name, module in same_shape:
            s = layer_stats(stats, name, module)
            w = effective_weight(module)
            keep = current_keep(module)
            h = s.hessian
            importance = h.diagonal()[None, :].expand_as(w)
            chosen = (lambda t: t[keep]) if keep is not None else (lambda t: t.reshape(-1))
            values = chosen(w).float()
            if values.numel() == 0:
                continue
            order = sweep_order(h, True)
            # the sweep assigns every weight to a centroid itself (with error feedback)
            if per_row:
                centroids = kmeans_rows(w, clusters, iterations, weights=importance, keep=keep,
                                        stored=row_centroids)
                rounder = RowCodebookRounder(centroids, order, keep)
            else:
                centroids, _ = kmeans_1d(values, clusters, iterations, weights=chosen(importance),
                                         perm=kept_sort(s, name, values), assign=False)
                rounder = CodebookRounder(centroids, order, keep)
            job = SweepJob(w, order, layer_factor(s, order), rounder)
            prepared.append(((module, s, w, keep, centroids), job))
        for ((module, s, w, keep, centroids), job), (q, _) in zip(prepared, sweep_layers([j for _, j in prepared])):
            correct_bias(module, w, q, s)
            indices = job.rounder.codes.long()  # the centroid each weight was rounded to in the sweep
            set_weight(module, q)
            parametrize.register_parametrization(
                module, "weight", Clustered(centroids, indices.reshape(module.weight.shape),
                                            None if keep is None else keep.reshape(module.weight.shape),
                                            row_centroids),
                unsafe=True)


def kept_for_layer(s: LayerStats, slot: tuple, key, compute, keep: int = 2):
    """``compute()``, kept on the statistics in ``slot`` (per layer: layers that share their input also share the
    statistics) for the last ``keep`` weights it was computed from (``key``: their digest). A knob change or a
    sweep on the same weights computes it once; a chain whose earlier step changes the weights at each knob value
    replaces the oldest entry instead of piling up copies. Two, because the studio's rows hold a method alone
    and the same method inside the combined chain."""
    kept = s.factors.setdefault(slot, OrderedDict())
    if key not in kept:
        kept[key] = compute()
        while len(kept) > keep:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return kept[key]


def kept_sort(s: LayerStats, name: str, values: torch.Tensor) -> torch.Tensor:
    """The permutation sorting ``values`` (a layer's weights, flattened), kept with its statistics: the sort is
    most of k-means' time, the same at every clusters knob and for both k-means algorithms on the same weights.
    Kept as int32, 4 bytes per weight (up to 2 x 80 MB for the shipped model)."""
    from .methods import sort_order

    values = values.detach().float().reshape(-1)
    fresh: list[torch.Tensor] = []

    def compute() -> torch.Tensor:
        fresh.append(sort_order(values))
        return fresh[0].to(torch.int32)

    kept = kept_for_layer(s, ("kmeans-sort", name), weight_digest(values), compute)
    # a sort just made is returned as it came (int64): a chain's k-means sorts new weights at every knob value,
    # and widening the kept copy back was 0.3 s of a studio Combined change
    return fresh[0] if fresh else kept.long()


def weight_digest(w: torch.Tensor) -> tuple:
    """Every build works on its own copy of the model: weights are recognised by their bytes."""
    w = w.detach().float().contiguous()
    return tuple(w.shape), hashlib.sha256(w.numpy()).hexdigest()  # the buffer itself: no copy; sha256: CPU-accelerated


# ----------------------------------------------------------------------------------------------- pruning
OWL_LAMBDA, OWL_OUTLIER = 0.08, 5.0  # OWL's published defaults; λ = 0.08 also beat 0.15 on dev 1-100 here


def owl_sparsities(layers, stats: CalibrationStats, sparsity: float) -> dict[str, float]:
    """{layer name: sparsity} after OWL (Yin et al. 2023, arXiv 2310.05175): a layer's outlier ratio is the
    share of its Wanda scores |W_ij|·‖X_j‖ above OWL_OUTLIER times their mean; the ratios, spread linearly over
    [-λ, λ], are taken off ``sparsity`` (more outliers, fewer weights removed), then all are shifted so that
    the mean over every weight is ``sparsity`` again (the same size as the uniform allocation)."""
    ratios, sizes = [], []
    for name, module in layers:
        score = effective_weight(module).abs() * layer_stats(stats, name, module).channel_norms[None, :]
        ratios.append((score > OWL_OUTLIER * score.mean()).double().mean())
        sizes.append(score.numel())
    ratios, sizes = torch.stack(ratios), torch.tensor(sizes, dtype=torch.float64)
    spread = (ratios - ratios.min()) / (ratios.max() - ratios.min()).clamp_min(1e-12)
    chosen = sparsity - (2 * spread - 1) * OWL_LAMBDA
    chosen = (chosen - ((chosen * sizes).sum() / sizes.sum() - sparsity)).clamp(0.0, 0.99)
    return {name: float(value) for (name, _), value in zip(layers, chosen)}


def prune(layers, stats: CalibrationStats, algo: str, sparsity: float, n: int = 0, m: int = 0,
          owl: bool = False, per_row: bool = False, refit: int = 0) -> None:
    """Wanda or SparseGPT per layer, exactly ``sparsity`` of each layer (or n of every m), then bias correction.
    Wanda, and SparseGPT with ``per_row``, prune the same share of every row; SparseGPT without it compares the
    saliencies of all rows in each block of inputs (its reference code), so a row that matters keeps more.
    ``owl``: each layer its own sparsity from :func:`owl_sparsities`."""
    per_layer = owl_sparsities(layers, stats, sparsity) if owl else {}
    for same_shape in by_shape(layers):
        prepared = []
        for name, module in same_shape:
            s = layer_stats(stats, name, module)
            w = effective_weight(module)
            layer_sparsity = per_layer.get(name, sparsity)
            if algo == "wanda":
                keep = row_mask(w.abs() * s.channel_norms[None, :], layer_sparsity, n, m)
                _finish_prune(module, s, w, w * keep, keep, refit)
                continue
            order = sweep_order(s.hessian, False)
            job = SweepJob(w, order, layer_factor(s, order), None, SparseGPTChooser(layer_sparsity, n, m, per_row))
            prepared.append(((module, s, w), job))
        for (module, s, w), (q, pruned) in zip((p for p, _ in prepared), sweep_layers([j for _, j in prepared])):
            _finish_prune(module, s, w, q * ~pruned, ~pruned, refit)


def refit_kept(w: torch.Tensor, q: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, steps: int) -> torch.Tensor:
    """Kept weights (out, in) moved towards the least squares of the layer's output error for a fixed mask,
    min_x Σ_r (x_r − w_r)ᵀ H (x_r − w_r) over x zero where ``keep`` (out, in) is False: ``steps`` of conjugate
    gradients from ``q`` (out, in), preconditioned by diag(H), all rows at once (each row is its own system; one
    (out, in) x (in, in) product a step; enough steps reach the exact solution). SparseGPT's update is exact only
    for the columns after each pruned one (it never revisits a column); this refits what its mask leaves (the
    weight update of Boža 2024, arXiv 2401.02938, by CG rather than ADMM). H is dampened as for GPTQ, which also
    keeps the refit from chasing the calibration set's quirks."""
    h = dampened(hessian)[0]
    x = q * keep
    residual = (w - x) @ h  # minus half the gradient; off the support it is never read (masked below)
    precondition = keep / h.diagonal()[None, :]  # diag(H)⁻¹ on the support, 0 off it
    z = residual * precondition
    direction = z.clone()
    rz = _row_dot(residual, z)
    for _ in range(steps):
        curved = direction @ h  # direction is 0 off the support, so direction · curved needs no mask
        step = rz / _row_dot(direction, curved).clamp_min(1e-30)
        x.addcmul_(direction, step)
        residual.addcmul_(curved, step, value=-1.0)
        torch.mul(residual, precondition, out=z)
        rz_next = _row_dot(residual, z)
        direction.mul_(rz_next / rz.clamp_min(1e-30)).add_(z)
        rz = rz_next
    return x


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(out, in), (out, in) -> (out, 1): each row's dot product, without an (out, in) temporary."""
    return torch.linalg.vecdot(a, b, dim=1).unsqueeze(1)


def _finish_prune(module: nn.Module, s: LayerStats, w: torch.Tensor, q: torch.Tensor, keep: torch.Tensor,
                  refit: int = 0) -> None:
    from .methods import Mask

    if refit:
        q = refit_kept(w, q, keep, s.hessian, refit)
    correct_bias(module, w, q, s)
    set_weight(module, q)
    parametrize.register_parametrization(module, "weight", Mask(keep.reshape(module.weight.shape)))


# ----------------------------------------------------------------------------------------------- low rank
def _whitened_svd(w: torch.Tensor, s: LayerStats, name: str):
    """(S, U, Σ, Vᵀ of W S, the singular values of W) for C = S Sᵀ, kept on the statistics for this layer's
    weight (:func:`kept_for_layer`): they do not depend on the rank, so moving the energy knob (or a sweep over
    it) factorises each layer once."""
    def factorise():
        lower = cholesky_dampened(s.covariance).float()
        u, sigma, vh = torch.linalg.svd(w @ lower, full_matrices=False)  # float32: float64 costs 3x, same rank
        return lower, u, sigma, vh, torch.linalg.svdvals(w)
    return kept_for_layer(s, ("svd-llm", name), weight_digest(w), factorise)


def activation_svd(module: nn.Linear, s: LayerStats, energy: float | None, rank: int | None, name: str = ""):
    """SVD-LLM: with C = S Sᵀ the input covariance, truncate the SVD of W S, so the kept directions are those
    that carry the most *output* variance on real inputs, and compensate the bias for the mean. ``energy``
    picks the rank as the weight's own spectrum would (so ``algo=weight`` and ``algo=activation`` are the same
    size, and differ only in which directions they keep: the whitened spectrum is so concentrated that its
    own 90% would keep far too few). Returns (rank, up (out, r), down (r, in), new bias) or None when the
    factorisation would not save parameters. ``name``: the layer's (its factors are kept per layer)."""
    w = module.weight.detach().float()
    out_f, in_f = w.shape
    lower, u, sigma, vh, weight_sigma = _whitened_svd(w, s, name)
    if rank is None:  # the rank the weight's own spectrum keeps at this energy: the data-free twin's size
        share = torch.cumsum(weight_sigma ** 2, 0) / (weight_sigma ** 2).sum().clamp_min(1e-30)
        rank = int((share < energy - 1e-7).sum().item()) + 1
    rank = min(rank, sigma.numel())
    if rank * (in_f + out_f) >= in_f * out_f:
        return None
    root = sigma[:rank].sqrt()
    up = u[:, :rank] * root[None, :]
    down = torch.linalg.solve_triangular(lower, root[:, None] * vh[:rank], upper=False, left=False)  # (Σ½Vᵀ) S⁻¹
    bias = module.bias.detach().float() if module.bias is not None else None
    if bias is not None:
        bias = bias + (w - up @ down) @ s.mean
    return rank, up, down, bias


# ----------------------------------------------------------------------------------------------- structured
def refit_after_removal(linear: nn.Linear, s: LayerStats, keep: torch.Tensor, damp: float = 1e-3):
    """The layer after removed inputs, refitted on the kept ones by least squares (SlimGPT / ZipLM):
    W' = W·C[:, K]·(C[K, K] + λI)⁻¹ with C the centred input covariance, and b' = b + W·μ − W'·μ_K, which also
    compensates the removed inputs' mean (FLAP's bias compensation). Returns (W' (out, |K|), b' (out,))."""
    w = linear.weight.detach().double()
    cov = s.covariance.double()
    mean = s.mean.double()
    sub, _ = dampened(cov[keep][:, keep].float(), damp)
    w_new = torch.linalg.solve(sub.double(), (w @ cov[:, keep]).T).T
    bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    b_new = bias + w @ mean - w_new @ mean[keep]
    return w_new.float(), b_new.float()


def fluctuation(linear: nn.Linear, s: LayerStats) -> torch.Tensor:
    """FLAP's importance of each input channel of ``linear``: its variance on calibration data x the squared
    norm of the weight column it feeds, i.e. how much output variance removing it would leave unexplained."""
    return s.covariance.diagonal().clamp_min(0) * linear.weight.detach().float().pow(2).sum(0)


def structured_reconstruct(model, keep_units: int, keep_heads: int, stats: CalibrationStats, ffn: bool,
                           heads: bool) -> None:
    """Remove the least important FFN units and heads of every block (FLAP's fluctuation metric), then refit the
    FFN's second linear and the attention output projection on what is kept. Shapes change in place."""
    from .methods import _cols, _rows

    for bi, block in enumerate(model.blocks):
        for part in ("ffn1", "ffn2"):
            f = getattr(block, part)
            if f is None or not ffn:
                continue
            s = layer_stats(stats, f"blocks.{bi}.{part}.linear2", f.linear2)
            keep = fluctuation(f.linear2, s).topk(keep_units).indices.sort().values
            w, b = refit_after_removal(f.linear2, s, keep)
            f.linear1, f.linear2 = _rows(f.linear1, keep), _cols(f.linear2, keep)
            with torch.no_grad():
                f.linear2.weight.copy_(w)
                if f.linear2.bias is not None:
                    f.linear2.bias.copy_(b)
        if not heads:
            continue
        a = block.attn
        s = layer_stats(stats, f"blocks.{bi}.attn.out_proj", a.out_proj)
        head_dim = a.out_proj.in_features // a.n_heads
        score = fluctuation(a.out_proj, s).reshape(a.n_heads, head_dim).sum(1)
        chosen = score.topk(keep_heads).indices.sort().values
        keep = (chosen[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        w, b = refit_after_removal(a.out_proj, s, keep)
        a.q_proj, a.k_proj, a.v_proj = (_rows(p, keep) for p in (a.q_proj, a.k_proj, a.v_proj))
        a.out_proj = _cols(a.out_proj, keep)
        with torch.no_grad():
            a.out_proj.weight.copy_(w)
            if a.out_proj.bias is not None:
                a.out_proj.bias.copy_(b)
        a.n_heads = keep_heads
