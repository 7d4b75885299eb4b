"""Optimal-brain-surgeon sweeps: GPTQ (Frantar et al. 2022) and SparseGPT (Frantar & Alistarh 2023), one layer
or a batch of same-shaped layers at a time.

Both minimise the layer's output error on calibration inputs, ‖(W − Ŵ) X‖², one input column at a time: a
column is rounded (to a grid, a codebook, or zero where the mask prunes), and its error is pushed onto the
columns not yet rounded through the upper Cholesky factor U of H⁻¹ (H = E[x xᵀ], dampened). Columns are taken
in blocks of 128 with lazy updates, as in the reference implementations; written here from the papers (the
reference code is written for GPUs and Hugging Face layers, and our quantizers and masks are our own).

Shapes: W (out, in) -- a convolution's weight viewed as (out, in x kernel); H (in, in). A batch of L layers
adds a leading L to every tensor of the sweep (:func:`sweep_layers`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from asr_core.errors import SettingsError

from .calibration import LayerStats, dampened

BLOCK = 128
# layers swept together hold their (in, in) factors and four (in, out) working copies side by side: at most this
BATCH_BYTES = 256 * 2 ** 20


class GridRounder:
    """Round to the uniform grid scale x {low..high} (``scales`` one per weight, (out, in)); pruned entries
    (``keep`` False) to 0. Laid out in sweep order once, so each column reads one row."""

    def __init__(self, scales: torch.Tensor, low: int, high: int, order: torch.Tensor,
                 keep: torch.Tensor | None = None):
        self.key = ("grid", low, high)
        self.low, self.high = low, high
        self.scales = scales[:, order].T.contiguous()  # (in, out) in sweep order; (L, in, out) once stacked
        self.keep = None if keep is None else keep[:, order].T.contiguous().float()

    def __call__(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """rows (L, out): column k of each layer in the batch -> its rounded values."""
        q = (rows / self.scales[:, k]).round_().clamp_(self.low, self.high).mul_(self.scales[:, k])
        return q if self.keep is None else q.mul_(self.keep[:, k])


class CodebookRounder:
    """Round to the nearest of sorted ``centroids`` (C,); pruned entries to 0."""

    def __init__(self, centroids: torch.Tensor, order: torch.Tensor, keep: torch.Tensor | None = None):
        self.key = ("codebook", centroids.numel())
        self.centroids = centroids.float().contiguous()  # (C,); (L, C) once stacked
        self.mids = ((self.centroids[1:] + self.centroids[:-1]) / 2).contiguous()
        self.keep = None if keep is None else keep[:, order].T.contiguous().float()
        self.codes = None  # after the sweep: the centroid index of every weight (out, in), int32

    def record(self, shape) -> torch.Tensor:
        """Keep the index each column rounds to, (L, in, out) in sweep order: the caller stores indices, and
        finding them again from the rounded weights would be one more search per weight."""
        self.codes = torch.empty(shape, dtype=torch.int32)
        return self.codes

    def __call__(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        index = torch.searchsorted(self.mids, rows.contiguous())
        if self.codes is not None:
            self.codes[:, k] = index
        q = self.centroids.gather(1, index)
        return q if self.keep is None else q.mul_(self.keep[:, k])


class RowCodebookRounder(CodebookRounder):
    """Round each output row to the nearest of its own sorted ``centroids`` (out, C); pruned entries to 0."""

    def __init__(self, centroids: torch.Tensor, order: torch.Tensor, keep: torch.Tensor | None = None):
        super().__init__(centroids, order, keep)
        self.key = ("row-codebook", centroids.shape[-1])
        self.mids = ((self.centroids[..., 1:] + self.centroids[..., :-1]) / 2).contiguous()  # (out, C-1)

    def __call__(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """rows: column k of every stacked layer (L, out) -> rounded (L, out); centroids (L, out, C)."""
        index = torch.searchsorted(self.mids, rows.unsqueeze(-1).contiguous())  # (L, out, 1)
        if self.codes is not None:
            self.codes[:, k] = index.squeeze(-1)
        q = self.centroids.gather(2, index).squeeze(-1)
        return q if self.keep is None else q.mul_(self.keep[:, k])


def _stacked(rounders: list):
    """The rounders of a batch of layers as one, their tensors stacked on a leading layer dimension (a layer
    without a keep mask keeps everything)."""
    first = rounders[0]
    if first is None:
        return None
    batch = copy.copy(first)
    for field in ("scales", "centroids", "mids"):
        if field in first.__dict__:
            setattr(batch, field, torch.stack([getattr(r, field) for r in rounders]))
    if any(r.keep is not None for r in rounders):
        like = next(r.keep for r in rounders if r.keep is not None)
        batch.keep = torch.stack([torch.ones_like(like) if r.keep is None else r.keep for r in rounders])
    return batch


def _stacked_factors(uppers: list[torch.Tensor]) -> torch.Tensor:
    """The layers' U factors as one (L, in, in) tensor. The first sweep of a batch copies them side by side and
    moves each factor onto its slice of the copy (``Tensor.set_``: the same tensor object, so the statistics'
    cache now holds views of the stacked one, at no extra memory); a later sweep of the same batch (the next knob
    value, the next recipe) finds them already side by side and reads them in place. The copy of a 2048-wide
    batch was 10-15% of a calibrated k-means build."""
    first = uppers[0]
    n = first.shape[-1]
    storage = first.untyped_storage()
    in_place = all(u.is_contiguous() and u.untyped_storage().data_ptr() == storage.data_ptr()
                   and u.storage_offset() == first.storage_offset() + b * n * n for b, u in enumerate(uppers))
    if in_place:
        return first.as_strided((len(uppers), n, n), (n * n, n, 1))
    stacked = torch.stack(uppers)
    for b, u in enumerate(uppers):
        u.set_(stacked.untyped_storage(), b * n * n, (n, n), (n, 1))
    return stacked


def sweep_order(hessian: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Column order of a sweep: largest H diagonal first (GPTQ's activation order), or as they are."""
    n = hessian.shape[0]
    return torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(n)


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


@dataclass
class SweepJob:
    """One layer to sweep: its weight (out, in), column ``order`` (:func:`sweep_order`), (U, dead) of its Hessian
    in that order (:func:`layer_factor` or :func:`inverse_cholesky`), what a column is rounded to (None: kept as
    it is, for pruning alone) and SparseGPT's mask chooser (None: nothing pruned)."""

    weight: torch.Tensor
    order: torch.Tensor
    factor: tuple[torch.Tensor, torch.Tensor]
    rounder: GridRounder | CodebookRounder | None = None
    choose_mask: "SparseGPTChooser | None" = None

    def batch_key(self) -> tuple:
        return (tuple(self.weight.shape), None if self.rounder is None else self.rounder.key,
                None if self.choose_mask is None else self.choose_mask.key)


def sweep_layers(jobs: list[SweepJob]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sweep` for many layers, the same-shaped ones side by side (a batch dimension on every operation):
    the sweep is a long chain of small operations per column, so on a CPU their count, not their size, sets
    the time, and a batch of L layers costs about as much as one. Results equal sweeping each layer alone (up
    to float rounding), in the jobs' order."""
    results: list = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.batch_key(), []).append(i)
    for indices in groups.values():
        out_f, width = jobs[indices[0]].weight.shape
        size = max(1, BATCH_BYTES // (4 * width * (width + 4 * out_f)))
        for c in range(0, len(indices), size):
            chunk = [jobs[i] for i in indices[c:c + size]]
            for i, result in zip(indices[c:c + size], _sweep_batch(chunk)):
                results[i] = result
    return results


def sweep(weight: torch.Tensor, hessian: torch.Tensor, rounder, order: torch.Tensor, *,
          choose_mask=None, damp: float = 0.01,
          factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round every column of one layer's ``weight``, in ``order``, with error feedback. Returns Ŵ (out, in) and
    the entries ``choose_mask`` pruned (bool (out, in); all False without it), in the original column order.
    ``factor``: (U, dead) of this Hessian in this order when already computed, else computed here."""
    factor = factor if factor is not None else inverse_cholesky(hessian.float()[order][:, order], damp)
    return sweep_layers([SweepJob(weight, order, factor, rounder, choose_mask)])[0]


@torch.no_grad()
def _sweep_batch(jobs: list[SweepJob]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The sweep of L same-shaped layers at once. Works on Wᵀ (L, in, out) so that a column is a contiguous
    row; U (L, in, in)."""
    wt = torch.stack([j.weight.detach().float()[:, j.order].T for j in jobs]).contiguous()
    upper = _stacked_factors([j.factor[0] for j in jobs])
    wt[torch.stack([j.factor[1] for j in jobs])] = 0.0  # inputs that were always zero: zero is what stores best
    rounder, choose = _stacked([j.rounder for j in jobs]), jobs[0].choose_mask
    codes = rounder.record(wt.shape) if hasattr(rounder, "record") else None
    n = wt.shape[1]
    out = torch.zeros_like(wt)
    pruned_all = torch.zeros_like(wt, dtype=torch.bool)
    # Inside a block, column k's current value is its value at the block's start less the errors of the
    # columns before it: row_k = block_k - Σ_{j<k} U[j, k] err_j. Computing only that row ("lazy") reads the
    # errors once, where pushing each error onto the whole rest of the block at once (the papers' rank-1 update)
    # reads and writes it: 1.3-1.7x faster here, the same numbers. A chooser that looks at the block's current
    # values mid-block (N:M) needs the rank-1 form.
    lazy = choose is None or choose.at_block_start
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        block, u = wt[:, i1:i2].clone(), upper[:, i1:i2, i1:i2]
        ut = u.transpose(1, 2).contiguous() if lazy else None  # ut[:, k, :k] = U[:k, k], one contiguous row
        errors = torch.empty_like(block)
        pruned = torch.zeros_like(block, dtype=torch.bool)
        d = u.diagonal(dim1=1, dim2=2)  # (L, b)
        for k in range(i2 - i1):
            if choose is not None:
                chosen = choose(block, d, k, i1)
                if chosen is not None:
                    pruned |= chosen
            if lazy and k:
                row = torch.baddbmm(block[:, k:k + 1], ut[:, k:k + 1, :k], errors[:, :k], alpha=-1.0).squeeze(1)
            else:
                row = block[:, k]
            q = row if rounder is None else rounder(row, i1 + k)  # row is only read below: no copy needed
            if choose is not None:
                q = q.masked_fill(pruned[:, k], 0.0)
            out[:, i1 + k] = q
            err = errors[:, k]
            torch.sub(row, q, out=err).div_(d[:, k:k + 1])
            if not lazy:
                block[:, k:].baddbmm_(u[:, k, k:].unsqueeze(2), err.unsqueeze(1), alpha=-1.0)
        pruned_all[:, i1:i2] = pruned
        wt[:, i2:].baddbmm_(upper[:, i1:i2, i2:].transpose(1, 2), errors, alpha=-1.0)
    results = []
    for b, job in enumerate(jobs):
        back = torch.argsort(job.order)
        results.append((out[b, back].T.contiguous(), pruned_all[b, back].T.contiguous()))
        if codes is not None:
            job.rounder.codes = codes[b, back].T.contiguous()
    return results


class SparseGPTChooser:
    """SparseGPT's adaptive mask selection: prune the lowest w² / d² (the OBS saliency).

    Unstructured: at the start of each block, as many per row as the cumulative count round(sparsity x end)
    asks. Without ``per_row``, the block's lowest saliencies over all its rows (the reference code's one
    threshold per block): the same total, more kept in the rows that matter. ``per_row``: that many in each row,
    so every row ends with exactly round(sparsity x width) zeros. N:M (n > 0): every m consecutive columns, the
    n lowest of each row. Called at each column k of the block that starts at sweep position ``start`` with the
    block's current weights (L, b, out) and the diagonal d (L, b) of its U; returns the entries to prune (bool
    (L, b, out)) or None.
    """

    def __init__(self, sparsity: float, n: int = 0, m: int = 0, per_row: bool = False):
        self.sparsity, self.n, self.m, self.per_row = sparsity, n, m, per_row
        self.key = ("sparsegpt", sparsity, n, m, per_row)
        self.at_block_start = not n  # unstructured: looks at each block only at its start (k = 0)

    def __call__(self, block: torch.Tensor, d: torch.Tensor, k: int, start: int) -> torch.Tensor | None:
        if self.n:
            if k % self.m:
                return None
            mask = torch.zeros_like(block, dtype=torch.bool)
            rows = slice(k, min(k + self.m, block.shape[1]))
            score = block[:, rows] ** 2 / d[:, rows, None] ** 2
            mask[:, rows].scatter_(1, score.topk(min(self.n, score.shape[1]), dim=1, largest=False).indices, True)
            return mask
        if k:
            return None
        count = round(self.sparsity * (start + block.shape[1])) - round(self.sparsity * start)
        if count <= 0:
            return torch.zeros_like(block, dtype=torch.bool)
        score = block ** 2 / d[:, :, None] ** 2
        if not self.per_row:  # one threshold over the whole block, as the reference code does: rows differ
            return lowest_entries(score.reshape(block.shape[0], -1), count * block.shape[2]).view_as(block)
        mask = torch.zeros_like(block, dtype=torch.bool)
        return mask.scatter_(1, score.topk(count, dim=1, largest=False).indices, True)


def lowest_entries(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask (L, n) of exactly ``count`` (1 ≤ count ≤ n) lowest entries of each row of ``score`` (L, n);
    among entries tied at the threshold, the first ones. ``topk`` asked for half of a 262k-entry row was most of
    a calibrated 60% prune's mask choice (0.85 s of a studio knob change); ``kthvalue`` (a selection, no sort)
    finds the threshold in a quarter of its time."""
    threshold = score.kthvalue(count, dim=1, keepdim=True).values
    mask = score < threshold
    tied = score == threshold
    room = count - mask.sum(dim=1, keepdim=True)  # ≥ 1: the threshold itself is tied
    return mask | (tied & (tied.cumsum(dim=1) <= room))


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
