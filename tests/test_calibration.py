"""Calibration statistics and the calibrated algorithms: each beats its data-free twin where it promises to."""
import os

import pytest
import soundfile as sf
import torch
from torch import nn

from asr_core.config import preset
from asr_core.errors import SettingsError
from asr_core.features import log_mel
from asr_core.model import ConformerCTC
from compression.artifact import to_runtime
from compression.calibration import (BUNDLED, CalibrationSet, collect_stats, dampened, layer_inputs,
                                     load_calibration)
from compression.compress import apply_recipe
from compression.methods import LowRankLinear, target_layers
from compression.obs import (CodebookRounder, GridRounder, SparseGPTChooser, SweepJob, _stacked, inverse_cholesky,
                             lowest_entries, row_mask, sweep, sweep_layers, sweep_order)
from compression.quantize import fake_quantize
from compression.recipe import parse_recipe

from conftest import speechlike

SKIP = ("subsampling.conv1", "head")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ConformerCTC(preset("tiny", d_model=96, ffn_dim=256, n_heads=4, dropout=0.0, transformer_layers=1)).eval()


@pytest.fixture(scope="module")
def calibration(model):
    feats = [log_mel(speechlike(2.0 + 0.3 * i, seed=i), model.cfg.features) for i in range(8)]
    return CalibrationSet(feats, "synthetic", sum(f.shape[0] for f in feats) / 100, model.cfg.features)


@pytest.fixture(scope="module")
def stats(model, calibration):
    return collect_stats(model, calibration)


def output_error(original: nn.Module, compressed: nn.Module, stats) -> float:
    """Σ over target layers of tr((W − Ŵ) C (W − Ŵ)ᵀ) / tr(W C Wᵀ): each layer's relative output error on the
    calibration inputs of the original model (what a layer-wise method minimises), C their covariance (the
    shift of the mean is what bias correction removes; leaving it out favours the data-free twin)."""
    runtime = dict(to_runtime(compressed).named_modules())
    total = 0.0
    for name, layer in target_layers(original, SKIP):
        if name not in runtime:
            continue
        new = runtime[name]
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        if isinstance(new, LowRankLinear):
            w_hat = new.up.weight @ new.down.weight
        else:
            w_hat = new.weight() if callable(new.weight) else new.weight
            w_hat = w_hat.dequantize() if w_hat.is_quantized else w_hat
        diff = w - w_hat.detach().reshape(w.shape)
        h = stats.get(name).covariance
        total += float(torch.trace(diff @ h @ diff.T) / torch.trace(w @ h @ w.T))
    return total


def test_bundled_set_loads_without_shared_data():
    assert BUNDLED.is_dir() and "shared" not in BUNDLED.parts
    calib = load_calibration(utterances=8)
    assert len(calib) == 8 and calib.audio_seconds > 30
    assert all(f.shape[1] == 80 for f in calib.features)


def test_statistics_are_the_inputs_each_layer_sees(model, calibration, stats):
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(args[0]))
               for n, m in model.named_modules() if n in ("blocks.1.ffn1.linear2", "subsampling.conv2")]
    with torch.no_grad():
        for f in calibration.features:
            model(f[None], torch.tensor([f.shape[0]]))
    for h in handles:
        h.remove()
    for name, inputs in seen.items():
        module = model.get_submodule(name)
        rows = torch.cat([layer_inputs(module, x) for x in inputs])
        assert torch.allclose(stats.get(name).gram, rows.T @ rows, rtol=1e-4, atol=1e-3)
        assert stats.get(name).n == rows.shape[0]
    # a convolution's unfolded columns times its weight viewed (out, in x kernel) is its output
    conv = model.subsampling.conv2
    x = torch.randn(1, conv.in_channels, 12, 20)
    rows = layer_inputs(conv, x)
    out = torch.nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    assert torch.allclose(rows @ conv.weight.reshape(conv.out_channels, -1).T,
                          out.permute(0, 2, 3, 1).reshape(-1, conv.out_channels), atol=1e-4)
    # q, k and v read one tensor: one accumulator
    assert stats.get("blocks.0.attn.q_proj") is stats.get("blocks.0.attn.v_proj")


def _correlated_inputs(n=2000, width=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) * torch.logspace(0, -2, width)[None, :]
    x = torch.randn(n, width, generator=g) @ mix.T
    x[:, :4] *= 20  # a few outlier channels, as real activations have
    return x


def test_gptq_beats_round_to_nearest_on_a_random_layer():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = _correlated_inputs()
    h = x.T @ x / x.shape[0]
    for kind, group in (("int4", 32), ("ternary", 0)):
        rtn = fake_quantize(w, kind, group or 64)
        from compression.calibrated import search_scales
        from compression.quantize import GRID, element_scales

        scales = search_scales(w, h.diagonal(), kind, group or 64)
        full = element_scales(scales, kind, group or 64, w.shape[1])
        low, high = GRID[kind]
        order = sweep_order(h, True)
        q, _ = sweep(w, h, GridRounder(full, low, high, order), order)
        err = lambda q_: float(((x @ (w - q_).T) ** 2).sum())  # noqa: E731
        assert err(q) < 0.6 * err(rtn), (kind, err(q), err(rtn))
        assert torch.equal(torch.round(q / full).clamp(low, high) * full, q)  # every weight on its grid


def _eager_sweep(w, upper, rounder, n_m=None):
    """The sweep as the papers state it: one column at a time, its error pushed at once onto every later column."""
    wt, out = w.T.clone(), torch.zeros(w.shape[1], w.shape[0])
    pruned = torch.zeros_like(wt, dtype=torch.bool)
    for k in range(wt.shape[0]):
        if n_m and k % n_m[1] == 0:
            rows = slice(k, k + n_m[1])
            score = wt[rows] ** 2 / upper.diagonal()[rows][:, None] ** 2
            pruned[rows].scatter_(0, score.topk(n_m[0], dim=0, largest=False).indices, True)
        row = wt[k].clone() if rounder is None else rounder(wt[k][None], k)[0]
        out[k] = row.masked_fill(pruned[k], 0.0)
        wt[k:] -= torch.outer(upper[k, k:], (wt[k] - out[k]) / upper[k, k])
    return out.T, pruned.T


def test_blocked_sweep_is_the_column_by_column_sweep():
    """The blocks only defer updates: the result is the plain column-at-a-time sweep's, for a
    grid (GPTQ) and for a 2:4 mask chosen as it goes (SparseGPT), on a width that fills no block evenly."""
    from compression.obs import inverse_cholesky

    torch.manual_seed(0)
    x = _correlated_inputs(width=300)
    h = x.T @ x / x.shape[0]
    w = torch.randn(48, 300)
    order = torch.arange(300)
    upper, _ = inverse_cholesky(h)
    scales = torch.full_like(w, 0.25)
    grid = GridRounder(scales, -8, 7, order)
    blocked, _ = sweep(w, h, grid, order)
    assert torch.allclose(blocked, _eager_sweep(w, upper, _stacked([grid]))[0], atol=1e-4)
    blocked, mask = sweep(w, h, None, order, choose_mask=SparseGPTChooser(0.5, 2, 4))
    eager, eager_mask = _eager_sweep(w, upper, None, (2, 4))
    assert torch.equal(mask, eager_mask) and torch.allclose(blocked, eager, atol=1e-4)


def test_the_lazy_in_block_sweep_equals_the_rank_one_updates():
    """Unstructured SparseGPT and k-means sweep each block lazily (a column's value from the errors before it);
    forcing the papers' rank-1 form gives the same mask, the same weights and, for a codebook, the same indices."""
    from compression.obs import CodebookRounder, inverse_cholesky

    torch.manual_seed(0)
    x = _correlated_inputs(width=300)
    h = x.T @ x / x.shape[0]
    w = torch.randn(48, 300)
    order = sweep_order(h, True)
    factor = inverse_cholesky(h[order][:, order])
    lazy, rank_one = SparseGPTChooser(0.5), SparseGPTChooser(0.5)
    rank_one.at_block_start = False
    q_lazy, m_lazy = sweep(w, h, None, order, choose_mask=lazy, factor=factor)
    q_rank, m_rank = sweep(w, h, None, order, choose_mask=rank_one, factor=factor)
    assert torch.equal(m_lazy, m_rank) and torch.allclose(q_lazy, q_rank, atol=1e-5)
    assert int(m_lazy.sum()) == w.numel() // 2
    centroids = torch.linspace(-2, 2, 16)
    rounder = CodebookRounder(centroids, order)
    q, _ = sweep(w, h, rounder, order, factor=factor)
    assert torch.equal(centroids[rounder.codes.long()], q)  # the recorded index of every weight is its centroid
    prunes_nothing = SparseGPTChooser(0.0)
    prunes_nothing.at_block_start = False  # forces the rank-1 form, changes nothing else
    q_rank, pruned = sweep(w, h, CodebookRounder(centroids, order), order, choose_mask=prunes_nothing, factor=factor)
    assert not pruned.any() and torch.allclose(q, q_rank, atol=1e-6)


def test_layers_swept_side_by_side_equal_each_swept_alone():
    """sweep_layers batches same-shaped layers (each with its own Hessian, order, scales, codebook or mask) and
    gives what sweeping each alone gives; layers of other shapes are swept in their own batch."""
    torch.manual_seed(0)
    jobs = []
    for i, (out_f, width) in enumerate(((24, 160), (24, 160), (24, 160), (16, 96))):
        x = _correlated_inputs(width=width, seed=i)
        h = x.T @ x / x.shape[0]
        w = torch.randn(out_f, width)
        order = sweep_order(h, act_order=i % 2 == 0)
        keep = torch.rand(out_f, width) > 0.3 if i == 1 else None
        jobs.append((w, h, order, keep))
    for make in (lambda w, order, keep: (GridRounder(torch.full_like(w, 0.2), -8, 7, order, keep), None),
                 lambda w, order, keep: (CodebookRounder(torch.linspace(-2, 2, 8), order, keep), None),
                 lambda w, order, keep: (None, SparseGPTChooser(0.5))):
        batch = [SweepJob(w, order, inverse_cholesky(h[order][:, order]), *make(w, order, keep))
                 for w, h, order, keep in jobs]
        together = sweep_layers(batch)
        for job, (q, pruned) in zip(batch, together):
            alone, alone_pruned = sweep_layers([job])[0]
            assert torch.allclose(q, alone, atol=1e-5) and torch.equal(pruned, alone_pruned)
        if batch[1].rounder is not None:  # the layer with a mask from an earlier step keeps its zeros
            assert torch.equal(together[1][0][~jobs[1][3]], torch.zeros(int((~jobs[1][3]).sum())))


def test_a_batch_sweeps_its_factors_in_place_the_second_time():
    """The first sweep of a batch stacks its layers' U factors and moves each onto its slice of the stack (the same
    tensor objects, the same values); the second sweep of that batch reads them there, with no copy, and rounds
    exactly as the first. A factor shared by two layers of the batch (q/k/v share their statistics) is copied
    again each time, and still right."""
    from compression.obs import _stacked_factors

    torch.manual_seed(0)
    jobs, uppers = [], []
    for i in range(3):
        x = _correlated_inputs(width=96, seed=i)
        h = x.T @ x / x.shape[0]
        order = sweep_order(h, act_order=True)
        factor = inverse_cholesky(h[order][:, order])
        uppers.append(factor[0].clone())
        jobs.append(SweepJob(torch.randn(16, 96), order, factor, CodebookRounder(torch.linspace(-2, 2, 8), order)))
    first = sweep_layers(jobs)
    for job, upper in zip(jobs, uppers):
        assert torch.equal(job.factor[0], upper)  # moved, not changed
    stacked = _stacked_factors([j.factor[0] for j in jobs])
    assert stacked.data_ptr() == jobs[0].factor[0].data_ptr()  # read in place: no new tensor
    second = sweep_layers(jobs)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    shared = [jobs[0].factor[0], jobs[0].factor[0]]
    again = _stacked_factors(shared)
    assert torch.equal(again[0], uppers[0]) and torch.equal(again[1], uppers[0])


def test_a_layers_factor_is_computed_once_per_order_and_changes_nothing():
    """Builds from the same statistics (a knob sweep, the benchmark's recipes) reuse each layer's factor of the
    Hessian: the same tensors come back, and a sweep with them equals one that factors on its own."""
    from compression.calibration import LayerStats
    from compression.obs import layer_factor

    torch.manual_seed(0)
    x = _correlated_inputs()
    stats = LayerStats(x.T @ x, x.sum(0), x.shape[0])
    w = torch.randn(32, x.shape[1])
    natural, by_size = sweep_order(stats.hessian, False), sweep_order(stats.hessian, True)
    first = layer_factor(stats, natural)
    assert layer_factor(stats, natural)[0] is first[0] and layer_factor(stats, by_size)[0] is not first[0]
    assert len(stats.factors) == 2
    chooser = SparseGPTChooser(0.5)
    alone = sweep(w, stats.hessian, None, natural, choose_mask=chooser)
    cached = sweep(w, stats.hessian, None, natural, choose_mask=chooser, factor=first)
    assert torch.equal(alone[0], cached[0]) and torch.equal(alone[1], cached[1])


def test_svd_llm_factorises_a_layer_once_for_every_energy():
    from compression.calibrated import activation_svd
    from compression.calibration import LayerStats

    torch.manual_seed(0)
    x = _correlated_inputs()
    layer = nn.Linear(x.shape[1], 48)
    stats = LayerStats(x.T @ x, x.sum(0), x.shape[0])
    low, high = activation_svd(layer, stats, 0.5, None), activation_svd(layer, stats, 0.9, None)
    kept = next(iter(stats.factors[("svd-llm", "")].values()))
    assert low[0] < high[0]
    fresh = activation_svd(layer, LayerStats(x.T @ x, x.sum(0), x.shape[0]), 0.9, None)
    assert all(torch.equal(a, b) for a, b in zip(high[1:], fresh[1:]))
    assert activation_svd(layer, stats, 0.7, None) and len(stats.factors[("svd-llm", "")]) == 1  # reused
    for scale in (0.5, 0.5, 0.5):  # other weights (e.g. an earlier step of a chain): at most two kept
        with torch.no_grad():
            layer.weight.mul_(scale)
        activation_svd(layer, stats, 0.9, None)
    assert len(stats.factors[("svd-llm", "")]) == 2 and all(v is not kept for v in stats.factors[("svd-llm", "")].values())


@pytest.mark.parametrize("recipes, slot", [(("svd:energy=0.8,algo=weight", "svd:energy=0.9,algo=weight"), "weight-svd"),
                                           (("kmeans:clusters=8,algo=lloyd", "kmeans:clusters=12,algo=lloyd"),
                                            "kmeans-sort")])
def test_data_free_builds_keep_what_a_knob_change_repeats(model, calibration, recipes, slot):
    """With statistics at hand (the studio, the benchmark), the data-free SVD and k-means keep each layer's SVD /
    sort with them, as their calibrated twins do: the second knob value computes none again, and every build is
    exactly what it is without statistics."""
    stats = collect_stats(model, calibration)  # a fresh one: nothing kept yet
    first = None
    for recipe in recipes:
        kept = apply_recipe(model, parse_recipe(recipe), stats=stats)
        alone = apply_recipe(model, parse_recipe(recipe))
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), alone.state_dict().values()))
        entries = {key: next(iter(kept_one.values())) for layer in stats.layers.values()
                   for key, kept_one in layer.factors.items() if key[0] == slot and len(kept_one) == 1}
        assert entries, recipe
        if first is None:
            first = entries
        else:  # the same objects: the second knob value computed none of them again
            assert entries.keys() == first.keys() and all(entries[k] is first[k] for k in first)


def test_kept_factors_are_one_per_layer_and_follow_the_weights():
    """What a knob change would recompute on the same weights is kept per layer (layers sharing their input share
    the statistics, so the slot names the layer); other weights replace it; k-means with the kept sort clusters
    exactly as sorting again."""
    from compression.calibrated import kept_for_layer, weight_digest
    from compression.calibration import LayerStats
    from compression.methods import kmeans_1d

    torch.manual_seed(0)
    values, mass = torch.randn(5000), torch.rand(5000)
    stats, calls = LayerStats(torch.eye(4), torch.zeros(4), 1), []

    def sort_of(v, name):
        return kept_for_layer(stats, ("kmeans-sort", name), weight_digest(v),
                              lambda: calls.append(name) or v.argsort().to(torch.int32)).long()
    for k in (4, 16):
        cached = kmeans_1d(values, k, 30, weights=mass, perm=sort_of(values, "q"))
        plain = kmeans_1d(values, k, 30, weights=mass)
        assert torch.equal(cached[0], plain[0]) and torch.equal(cached[1], plain[1])
    sort_of(values * 2, "k")  # a sibling layer on the same statistics: its own slot
    assert calls == ["q", "k"] and sort_of(values, "q") is not None and calls == ["q", "k"]
    sort_of(values * 3, "q")  # other weights in the same layer (a chain's): kept beside the first
    sort_of(values, "q")
    assert calls == ["q", "k", "q"]
    sort_of(values * 4, "q")  # a third: the least recently used goes
    sort_of(values, "q")
    assert calls == ["q", "k", "q", "q"] and len(stats.factors[("kmeans-sort", "q")]) == 2


@pytest.mark.parametrize("recipe, twin", [
    ("int4:group=32", "int4:group=32,algo=rtn"),
    ("ternary", "ternary:algo=rtn"),
    ("kmeans:clusters=8", "kmeans:clusters=8,algo=lloyd,codebook=row"),
    ("kmeans:clusters=8,codebook=layer", "kmeans:clusters=8,algo=lloyd"),
    ("prune:sparsity=0.5", "prune:sparsity=0.5,algo=magnitude,scope=layer"),
    ("prune:sparsity=0.5,algo=wanda", "prune:sparsity=0.5,algo=magnitude,scope=layer"),
    ("prune:pattern=2:4", "prune:pattern=2:4,algo=magnitude"),
    ("svd:rank=24", "svd:rank=24,algo=weight"),
    ("prune:sparsity=0.5+int4:group=32", "prune:sparsity=0.5,algo=magnitude,scope=layer+int4:group=32,algo=rtn"),
])
def test_calibrated_algorithm_beats_its_data_free_twin(model, stats, recipe, twin):
    calibrated = apply_recipe(model, parse_recipe(recipe), stats=stats)
    naive = apply_recipe(model, parse_recipe(twin), stats=stats)
    assert output_error(model, calibrated, stats) < 0.9 * output_error(model, naive, stats)


def test_pruning_gives_exactly_the_asked_sparsity_and_pattern(model, stats):
    for recipe in ("prune:sparsity=0.5", "prune:sparsity=0.4,select=row", "prune:sparsity=0.3,algo=wanda",
                   "prune:pattern=2:4", "prune:pattern=1:4,algo=wanda"):
        parsed = parse_recipe(recipe)
        pruned = to_runtime(apply_recipe(model, parsed, stats=stats))
        settings = parsed.steps[0][1]
        n, m = settings.n_m
        for name, layer in target_layers(pruned, SKIP):
            w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
            zeros = (w == 0).sum(1)
            if n:
                groups = (w[:, : w.shape[1] // m * m] == 0).reshape(w.shape[0], -1, m).sum(2)
                assert bool((groups >= n).all()), (recipe, name)
            elif settings.algo == "sparsegpt" and settings.select != "row":  # the layer's share, rows differ
                assert int(zeros.sum()) >= round(parsed.steps[0][1].sparsity * w.shape[1]) * w.shape[0], name
            else:
                assert bool((zeros >= round(parsed.steps[0][1].sparsity * w.shape[1])).all()), (recipe, name)
    with pytest.raises(SettingsError, match="select"):
        parse_recipe("prune:sparsity=0.5,algo=wanda,select=block")
    with pytest.raises(SettingsError, match="select"):
        parse_recipe("prune:sparsity=0.5,select=column")


def test_owl_moves_sparsity_to_layers_with_few_outliers_and_keeps_the_total(model, stats):
    from compression.calibrated import OWL_LAMBDA, owl_sparsities

    layers = target_layers(model, SKIP)
    chosen = owl_sparsities(layers, stats, 0.5)
    sizes = {name: layer.weight.numel() for name, layer in layers}
    assert abs(sum(chosen[n] * sizes[n] for n in sizes) / sum(sizes.values()) - 0.5) < 1e-6
    assert max(chosen.values()) - min(chosen.values()) == pytest.approx(2 * OWL_LAMBDA, abs=1e-6)
    # the layer with the fewest outliers, given ten times the activation of three input channels, has more
    # outliers: it keeps more weights
    boosted = dict(stats.layers)
    name = max(chosen, key=chosen.get)
    s = stats.layers[name]
    scale = torch.ones(s.gram.shape[0])
    scale[:3] = 10.0
    boosted[name] = type(s)(s.gram * scale[:, None] * scale[None, :], s.total * scale, s.n)
    again = owl_sparsities(layers, type(stats)(boosted, stats.calibration, stats.seconds), 0.5)
    assert again[name] < chosen[name]
    pruned = to_runtime(apply_recipe(model, parse_recipe("prune:sparsity=0.5,alloc=owl"), stats=stats))
    kept = {n: layer.weight for n, layer in target_layers(pruned, SKIP)}
    zeros = sum(int((kept[n] == 0).sum()) for n in sizes)
    assert zeros == pytest.approx(0.5 * sum(sizes.values()), rel=0.01)
    for n in sizes:  # each layer exactly its share
        rows = kept[n].detach().reshape(kept[n].shape[0], -1)
        assert int((rows == 0).sum()) >= round(chosen[n] * rows.shape[1]) * rows.shape[0], n
    with pytest.raises(SettingsError, match="alloc"):
        parse_recipe("prune:pattern=2:4,alloc=owl")
    with pytest.raises(SettingsError, match="alloc"):
        parse_recipe("prune:sparsity=0.5,alloc=best")


def test_sparsegpt_mask_and_row_mask_counts():
    torch.manual_seed(0)
    w = torch.randn(16, 200)
    x = _correlated_inputs(width=200)
    h = x.T @ x / x.shape[0]
    q, pruned = sweep(w, h, None, sweep_order(h, False), choose_mask=SparseGPTChooser(0.3, per_row=True))
    assert bool((pruned.sum(1) == round(0.3 * 200)).all()) and bool((q[pruned] == 0).all())
    keep = row_mask(torch.rand(16, 10), 0.0, 2, 4)
    assert bool(((~keep[:, :8]).reshape(16, 2, 4).sum(2) == 2).all()) and int((~keep[:, 8:]).sum(1)[0]) == 1


def test_lowest_entries_picks_exactly_the_lowest_even_through_ties():
    torch.manual_seed(0)
    score = torch.rand(3, 500)
    for count in (1, 137, 500):
        mask = lowest_entries(score, count)
        assert mask.sum(1).tolist() == [count] * 3
        assert bool((score[mask].reshape(3, -1).max(1).values <= score.masked_fill(mask, 2).min(1).values).all())
    tied = torch.tensor([[0.5, 0.0, 0.5, 0.5, 1.0, 0.5]])  # the threshold 0.5 is held by four entries
    assert lowest_entries(tied, 3).tolist() == [[True, True, True, False, False, False]]


def test_sparsegpt_block_threshold_keeps_more_of_the_rows_that_matter():
    """One threshold per block (the reference code): the layer's count exactly, loud rows keep more weights,
    and the output error on the inputs is lower than with the same count in every row."""
    torch.manual_seed(0)
    w = torch.randn(16, 200)
    w[:4] *= 10
    x = _correlated_inputs(width=200)
    h = x.T @ x / x.shape[0]
    errors, zeros = {}, {}
    for per_row in (True, False):
        q, pruned = sweep(w, h, None, sweep_order(h, False), choose_mask=SparseGPTChooser(0.3, per_row=per_row))
        assert int(pruned.sum()) == 16 * round(0.3 * 200) and bool((q[pruned] == 0).all())
        errors[per_row] = float(((x @ (q - w).T) ** 2).sum())
        zeros[per_row] = pruned.sum(1)
    assert bool((zeros[False][:4] < round(0.3 * 200)).all()) and bool((zeros[False][4:] > round(0.3 * 200)).all())
    assert errors[False] < 0.9 * errors[True], errors


def test_refit_kept_solves_the_least_squares_of_its_mask():
    """Least squares on the kept weights: the conjugate-gradient refit reaches each row's exact solution
    x_S = H_SS⁻¹ (H w)_S (with GPTQ's dampening), keeps the mask's zeros, and never does worse than its start."""
    from compression.calibrated import refit_kept

    torch.manual_seed(0)
    w = torch.randn(6, 24)
    x = _correlated_inputs(width=24)
    h = x.T @ x / x.shape[0]
    keep = torch.rand(6, 24) > 0.5
    start = w * keep
    refit = refit_kept(w, start, keep, h, 24)
    damped = dampened(h)[0].double()
    for r in range(6):
        kept = keep[r].nonzero().squeeze(1)
        exact = torch.linalg.solve(damped[kept][:, kept], (damped @ w[r].double())[kept])
        assert torch.allclose(refit[r, kept].double(), exact, rtol=1e-3, atol=1e-4), r
    assert bool((refit[~keep] == 0).all())

    def error(q):
        return float(torch.einsum("oi,ij,oj->", q - w, h, q - w))

    assert error(refit_kept(w, start, keep, h, 2)) < 0.9 * error(start)


def test_sparsegpt_refit_lowers_the_output_error_on_the_same_mask(model, stats):
    plain = apply_recipe(model, parse_recipe("prune:sparsity=0.5,refit=0"), stats=stats)
    refit = apply_recipe(model, parse_recipe("prune:sparsity=0.5"), stats=stats)
    layers = [dict(to_runtime(m).named_modules()) for m in (plain, refit)]
    for name, _ in target_layers(model, SKIP):  # the refit keeps SparseGPT's mask
        assert torch.equal(layers[0][name].weight == 0, layers[1][name].weight == 0), name
    ratio = output_error(model, refit, stats) / output_error(model, plain, stats)
    assert ratio < 0.8, ratio
    with pytest.raises(SettingsError, match="refit"):
        parse_recipe("prune:sparsity=0.5,algo=magnitude,refit=5")


def test_structured_refit_lowers_the_next_layers_output_error(model, calibration, stats):
    def block_outputs(m):
        outs = []
        hook = m.blocks[1].register_forward_hook(lambda mod, args, out: outs.append(out))
        with torch.no_grad():
            for f in calibration.features:
                m(f[None], torch.tensor([f.shape[0]]))
        hook.remove()
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])

    reference = block_outputs(model)
    errors = {}
    for algo in ("reconstruct", "norm"):
        pruned = apply_recipe(model, parse_recipe(f"structured:fraction=0.5,algo={algo}"), stats=stats)
        errors[algo] = float((block_outputs(pruned) - reference).norm() / reference.norm())
    assert errors["reconstruct"] < 0.8 * errors["norm"], errors


def test_chains_recollect_after_reshaping_steps(model, stats):
    chained = apply_recipe(model, parse_recipe("structured:fraction=0.25+int4:group=32"), stats=stats)
    runtime = to_runtime(chained)
    x = torch.randn(1, 120, 80)
    assert torch.isfinite(runtime(x, torch.tensor([120]))[0]).all()


def test_gptq_artifact_reloads_exactly(model, stats, tmp_path):
    from asr_core.text import CharTokenizer
    from compression.artifact import load_artifact, save_artifact

    for recipe in ("prune:sparsity=0.5+int4:group=32", "prune:sparsity=0.5+kmeans:clusters=16",
                   "kmeans:clusters=16,centroid_bits=16"):
        compressed = apply_recipe(model, parse_recipe(recipe), stats=stats)
        save_artifact(compressed, str(tmp_path / "a"), CharTokenizer(), {})
        loaded = dict(load_artifact(str(tmp_path / "a")).named_modules())
        live = dict(to_runtime(compressed).named_modules())
        for name, layer in target_layers(model, SKIP):
            assert torch.equal(loaded[name].weight, live[name].weight), (recipe, name)
            assert torch.equal(live[name].weight, compressed.get_submodule(name).weight.detach()), (recipe, name)


def test_bad_calibration_inputs_give_clear_errors(tmp_path, model, calibration):
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(SettingsError, match="No readable audio"):
        load_calibration(str(tmp_path))
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(SettingsError, match="No readable audio"):
        load_calibration(str(tmp_path))
    for i in range(2):
        sf.write(tmp_path / f"ok{i}.wav", speechlike(1.0, seed=i), 16000)
    with pytest.raises(SettingsError, match="at least 4 readable"):
        load_calibration(str(tmp_path))
    with pytest.raises(SettingsError, match="at least 4"):
        load_calibration(str(tmp_path), utterances=2)
    with pytest.raises(SettingsError, match="NaN"):
        dampened(torch.full((4, 4), float("nan")))
    # a singular (rank-deficient) Hessian with dead inputs is dampened, not refused
    x = torch.randn(10, 6)
    x[:, 2] = 0
    upper, dead = inverse_cholesky(x.T @ x)
    assert torch.isfinite(upper).all() and dead.tolist() == [False, False, True, False, False, False]
    with pytest.raises(SettingsError, match="calibration"):
        apply_recipe(model, parse_recipe("int4"), stats=collect_stats(model, CalibrationSet(
            calibration.features[:1], "one", 1.0, model.cfg.features)).__class__({}, calibration, 0.0))


def test_unknown_algo_is_refused():
    with pytest.raises(SettingsError, match="algo must be one of"):
        parse_recipe("int4:algo=awq")
    with pytest.raises(SettingsError, match="N:M"):
        parse_recipe("prune:pattern=4:2")
    assert os.path.isdir(BUNDLED)
