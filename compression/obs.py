"""Optimal-brain-surgeon sweeps: GPTQ (Frantar et al. 2022) and SparseGPT (Frantar & Alistarh 2023) on one layer.

Both minimise the layer's output error on calibration inputs, ‖(W − Ŵ) X‖², one input column at a time: a
column is rounded (to a grid, a codebook, or zero where the mask prunes), and its error is pushed onto the
columns not yet rounded through the upper Cholesky factor U of H⁻¹ (H = E[x xᵀ], dampened). Columns are taken
in blocks of 128 with lazy updates, as in the reference implementations; written here from the papers (the
reference code is written for GPUs and Hugging Face layers, and our quantizers and masks are our own).

Shapes: W (out, in) -- a convolution's weight viewed as (out, in x kernel); H (in, in).
"""
from __future__ import annotations

from typing import Callable

import torch

from asr_core.errors import SettingsError

from .calibration import LayerStats, dampened

BLOCK = 128
# rounder(row, k): the k-th column in sweep order (a contiguous (out,) row of Wᵀ) -> its rounded value
Rounder = Callable[[torch.Tensor, int], torch.Tensor]
ChooseMask = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor | None]


def sweep_order(hessian: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Column order of a sweep: largest H diagonal first (GPTQ's activation order), or as they are."""
    n = hessian.shape[0]
    return torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(n)


def grid_rounder(scales: torch.Tensor, low: int, high: int, order: torch.Tensor,
                 keep: torch.Tensor | None = None) -> Rounder:
    """Round to the uniform grid scale x {low..high} (``scales`` one per weight, (out, in)); pruned entries
    (``keep`` False) to 0. Scales and mask are laid out in sweep order once, so each call reads one row."""
    s_t = scales[:, order].T.contiguous()
    keep_t = None if keep is None else keep[:, order].T.contiguous().float()

    def rounder(row: torch.Tensor, k: int) -> torch.Tensor:
        q = (row / s_t[k]).round_().clamp_(low, high).mul_(s_t[k])
        return q if keep_t is None else q.mul_(keep_t[k])
    return rounder


def codebook_rounder(centroids: torch.Tensor, order: torch.Tensor, keep: torch.Tensor | None = None) -> Rounder:
    """Round to the nearest of sorted ``centroids``; pruned entries to 0."""
    mids = ((centroids[1:] + centroids[:-1]) / 2).contiguous()
    keep_t = None if keep is None else keep[:, order].T.contiguous().float()

    def rounder(row: torch.Tensor, k: int) -> torch.Tensor:
        q = centroids[torch.bucketize(row, mids)]
        return q if keep_t is None else q.mul_(keep_t[k])
    return rounder


def inverse_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + λI)⁻¹, so H⁻¹ = Uᵀ U, and the dead-input mask. A Hessian that stays
    singular is dampened ten times harder, up to three times, then refused with a SettingsError."""
    for attempt in range(4):
        h, dead = dampened(hessian, damp * 10 ** attempt)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, dead
    raise SettingsError("the calibration Hessian of a layer is singular even after dampening; "
                        "give more (or more varied) calibration audio")


def layer_factor(stats: LayerStats, order: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`inverse_cholesky` of the layer's Hessian in sweep ``order``, kept on the statistics: every build
    from the same statistics (the studio's rows and knob sweeps, the benchmark's recipes) factors each layer once
    per order. Costs one (in, in) float32 matrix per layer and order, as much as the statistics themselves."""
    key = (damp, order.numel(), hash(order.numpy().tobytes()))
    if key not in stats.factors:
        stats.factors[key] = inverse_cholesky(stats.hessian[order][:, order], damp)
    return stats.factors[key]


@torch.no_grad()
def sweep(weight: torch.Tensor, hessian: torch.Tensor, rounder: Rounder, order: torch.Tensor, *,
          choose_mask: ChooseMask | None = None, damp: float = 0.01,
          factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round every column of ``weight``, in ``order`` (:func:`sweep_order`), with error feedback. Returns Ŵ
    (out, in) and the entries ``choose_mask`` pruned (bool (out, in); all False without it), in the original
    column order.

    Works on Wᵀ so that a column is a contiguous row. ``choose_mask(Bᵀ, d, k, start)`` (SparseGPT): called at
    each column k of the block that starts at sweep position ``start``, with the block's current weights
    (b, out) and the diagonal d (b,) of its U; returns entries to prune (bool (b, out)) or None. ``factor``:
    (U, dead) of this Hessian in this order when already computed (:func:`layer_factor`), else computed here.
    """
    wt = weight.detach().float()[:, order].T.contiguous()  # (in, out), sweep order
    upper, dead = factor if factor is not None else inverse_cholesky(hessian.float()[order][:, order], damp)
    wt[dead] = 0.0  # inputs that were always zero: the weight does not matter, zero is what stores best
    n = wt.shape[0]
    out = torch.zeros_like(wt)
    pruned_all = torch.zeros_like(wt, dtype=torch.bool)
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        block, u = wt[i1:i2].clone(), upper[i1:i2, i1:i2]
        errors = torch.empty_like(block)
        pruned = torch.zeros_like(block, dtype=torch.bool)
        d = u.diagonal()
        for k in range(i2 - i1):
            if choose_mask is not None:
                chosen = choose_mask(block, d, k, i1)
                if chosen is not None:
                    pruned |= chosen
            row = block[k]
            q = rounder(row, i1 + k)
            if choose_mask is not None:
                q = q.masked_fill(pruned[k], 0.0)
            out[i1 + k] = q
            err = errors[k]
            torch.sub(row, q, out=err).div_(d[k])
            block[k:].addr_(u[k, k:], err, alpha=-1.0)
        pruned_all[i1:i2] = pruned
        wt[i2:].addmm_(upper[i1:i2, i2:].T, errors, alpha=-1.0)
    back = torch.argsort(order)
    return out[back].T.contiguous(), pruned_all[back].T.contiguous()


def sparsegpt_mask_chooser(sparsity: float, n: int = 0, m: int = 0) -> ChooseMask:
    """SparseGPT's adaptive mask selection: prune the lowest w² / d² (the OBS saliency) of each row.

    Unstructured: at the start of each block, per row, as many as the cumulative count round(sparsity x end)
    asks -- so every row ends with exactly round(sparsity x width) zeros. N:M (n > 0): every m consecutive
    columns, the n lowest of each row.
    """
    def choose(block: torch.Tensor, d: torch.Tensor, k: int, start: int) -> torch.Tensor | None:
        """block (b, out): the rows are columns of W."""
        if n:
            if k % m:
                return None
            mask = torch.zeros_like(block, dtype=torch.bool)
            rows = slice(k, min(k + m, block.shape[0]))
            score = block[rows] ** 2 / d[rows][:, None] ** 2
            mask[rows].scatter_(0, score.topk(min(n, score.shape[0]), dim=0, largest=False).indices, True)
            return mask
        if k:
            return None
        count = round(sparsity * (start + block.shape[0])) - round(sparsity * start)
        mask = torch.zeros_like(block, dtype=torch.bool)
        if count > 0:
            score = block ** 2 / d[:, None] ** 2
            mask.scatter_(0, score.topk(count, dim=0, largest=False).indices, True)
        return mask
    return choose


def row_mask(score: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """Keep-mask (out, in) pruning the lowest ``score`` of each row: exactly round(sparsity x in) per row, or
    n of every m consecutive entries (n:m; a trailing partial group prunes round(n/m x its size))."""
    out, width = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if n:
        full = width - width % m
        groups = score[:, :full].reshape(out, -1, m)
        drop = groups.topk(n, dim=2, largest=False).indices
        keep[:, :full] = keep[:, :full].reshape(out, -1, m).scatter(2, drop, False).reshape(out, full)
        rest = width - full
        if rest and round(n / m * rest):
            tail = score[:, full:].topk(round(n / m * rest), dim=1, largest=False).indices
            keep[:, full:] = keep[:, full:].scatter(1, tail, False)
        return keep
    k = round(sparsity * width)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep
