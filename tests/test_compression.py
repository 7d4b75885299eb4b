"""Every method keeps its promise, saves smaller, loads identical, and still decodes (tiny random models)."""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from asr_core.checkpoint import folder_bytes, load_model, save_model
from asr_core.config import preset
from asr_core.decoding import GreedyDecoder
from asr_core.errors import SettingsError
from asr_core.model import ConformerCTC
from asr_core.text import CharTokenizer
from compression.artifact import load_artifact, plain_fields, read_manifest, save_artifact, to_runtime
from compression.compress import apply_recipe, format_report, layer_report
from compression.methods import LowRankLinear, kmeans_1d, target_layers
from compression.packing import pack_bits, packed_nbytes, unpack_bits
from compression.quantize import PerRowInt8Linear, int_mm_is_exact, is_int8_runtime
from compression.recipe import parse_recipe


@pytest.fixture(scope="module")
def model():
    """Block 0 a plain Transformer block (no ffn1, no conv: as the shipped model's frozen Whisper blocks), block 1
    a full Conformer block, so every method meets both shapes."""
    torch.manual_seed(0)
    return ConformerCTC(preset("tiny", d_model=96, ffn_dim=256, n_heads=4, dropout=0.0, transformer_layers=1)).eval()


@pytest.fixture(scope="module")
def features():
    torch.manual_seed(1)
    return torch.randn(2, 240, 80), torch.tensor([240, 170])


def compressed_weights(model):
    runtime = to_runtime(model)
    out = {}
    for name, m in target_layers(runtime, ("subsampling.conv1", "head")):
        out[name] = m.weight.detach()
    return out


def stored_fields(stored, layers, name):
    """Layer ``name``'s packed fields as the artifact stores them, Huffman-coded ones decoded; the coded ones
    must be smaller than their packing."""
    packed = {k[len(name) + 8:]: v for k, v in stored.items() if k.startswith(f"{name}.weight.")}
    plain = plain_fields(packed, layers[name])
    for field in layers[name].get("huffman", ()):
        assert packed[field].numel() < plain[field].numel()
    return plain


def save_load(tmp_path, compressed, recipe_text):
    folder = tmp_path / recipe_text.replace(":", "_").replace("+", "__")
    save_artifact(compressed, str(folder), CharTokenizer(), parse_recipe(recipe_text).to_json())
    return str(folder)


RECIPES = ["int8", "int4:group=32", "ternary", "prune:sparsity=0.5", "prune:sparsity=0.7,scope=layer",
           "structured:fraction=0.5", "svd:energy=0.8", "svd:rank=8", "kmeans:clusters=16", "kmeans:clusters=5",
           "kmeans:clusters=16,centroid_bits=16", "prune:pattern=2:4,algo=magnitude+int8",
           "prune:sparsity=0.5+kmeans:clusters=16+int8", "structured:fraction=0.3+svd:rank=16+int8",
           "prune:sparsity=0.3+int4:group=16", "prune:sparsity=0.5+ternary", "prune:pattern=2:4"]


@pytest.mark.parametrize("recipe_text", RECIPES)
def test_save_load_identical_smaller_and_decodes(tmp_path, model, features, recipe_text):
    compressed = apply_recipe(model, parse_recipe(recipe_text))
    runtime = to_runtime(compressed)
    folder = save_load(tmp_path, compressed, recipe_text)
    loaded, tokenizer = load_model(folder)  # the one loader, as evaluate/transcribe/app use it
    with torch.no_grad():
        a, la = runtime(*features)
        b, lb = loaded(*features)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert isinstance(GreedyDecoder(tokenizer)(b[0, : lb[0]]), str)
    fp32 = tmp_path / "fp32"
    save_model(str(fp32), model, CharTokenizer())
    assert folder_bytes(folder) < folder_bytes(str(fp32))


def test_unstructured_pruning_is_exact_and_sparse_on_disk(tmp_path, model):
    compressed = apply_recipe(model, parse_recipe("prune:sparsity=0.7,algo=magnitude"))
    weights = compressed_weights(compressed)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert abs(zeros - round(0.7 * total)) <= 1
    sizes = {}
    for s in (0.3, 0.7):
        folder = save_load(tmp_path, apply_recipe(model, parse_recipe(f"prune:sparsity={s}")), f"prune:sparsity={s}")
        sizes[s] = os.path.getsize(os.path.join(folder, "model.safetensors"))
    assert sizes[0.7] < 0.7 * sizes[0.3]  # the artifact shrinks with sparsity


def test_per_layer_pruning_hits_each_layer(model):
    weights = compressed_weights(apply_recipe(model, parse_recipe("prune:sparsity=0.6,scope=layer,algo=magnitude")))
    for w in weights.values():
        assert abs(float((w == 0).float().mean()) - 0.6) < 0.01


@pytest.mark.parametrize("recipe, per_row", [("kmeans:clusters=5,codebook=layer", False), ("kmeans:clusters=5", True),
                                             ("kmeans:clusters=5,algo=lloyd,codebook=row", True),
                                             ("kmeans:clusters=5,centroid_bits=16", True)])
def test_kmeans_at_most_k_values_and_bits(tmp_path, model, recipe, per_row):
    """At most K values a layer (codebook=layer) or a row (codebook=row, the weighted default); ceil(log2 K)
    bits a weight; a row codebook stored as (out, K) uint8 codes on each row's grid, or fp16 (centroid_bits=16)."""
    compressed = apply_recipe(model, parse_recipe(recipe))
    for w in compressed_weights(compressed).values():
        rows = w.reshape(w.shape[0], -1)
        assert max(len(torch.unique(r)) for r in rows) <= 5 if per_row else len(torch.unique(w)) <= 5
        if per_row:
            assert len(torch.unique(w)) > 5  # the rows' levels differ
    folder = save_load(tmp_path, compressed, recipe)
    from safetensors.torch import load_file
    stored, layers = load_file(os.path.join(folder, "model.safetensors")), read_manifest(folder)["layers"]
    for name, m in target_layers(model, ("subsampling.conv1", "head")):
        plain = stored_fields(stored, layers, name)
        assert plain["indices"].numel() == packed_nbytes(m.weight.numel(), 3)  # ceil(log2 5) bits
        codebook = stored[f"{name}.weight.codebook"]
        assert codebook.shape == ((m.weight.shape[0], 5) if per_row else (5,))
        byte_grid = per_row and "centroid_bits=16" not in recipe  # row codebooks: 256-level grids unless asked
        assert codebook.dtype == (torch.uint8 if byte_grid else torch.float16 if per_row else torch.float32)
        if byte_grid:  # each row's lowest and highest centroid are the ends of its grid
            assert stored[f"{name}.weight.codebook_grid"].shape == (m.weight.shape[0], 2)
            assert int(codebook.min(1).values.max()) == 0 and int(codebook.max(1).values.min()) == 255


def test_kmeans_rows_is_each_rows_own_kmeans():
    """Batched over rows, the same centroids as kmeans_1d on each row alone (then rounded as stored); pruned
    entries pull nothing; the nearest centroid is found in each row's own codebook."""
    from compression.methods import kmeans_rows, nearest_in_rows

    torch.manual_seed(4)
    w = torch.randn(6, 50) * torch.linspace(0.1, 3.0, 6)[:, None]
    keep = torch.rand(6, 50) > 0.3
    weights = torch.rand(6, 50)
    centroids = kmeans_rows(w, 4, 30, weights=weights, keep=keep, stored="fp16")
    on_grids = kmeans_rows(w, 4, 30, weights=weights, keep=keep)  # the default: each row's 256-level grid
    for r in range(6):
        alone, _ = kmeans_1d(w[r][keep[r]], 4, 30, weights=weights[r][keep[r]])
        assert torch.allclose(centroids[r], alone.half().float(), atol=1e-3)
        step = float(alone.max() - alone.min()) / 255
        assert torch.allclose(on_grids[r], alone, atol=step / 2 + 2e-3)
    index = nearest_in_rows(w, centroids)
    distance = (w[:, :, None] - centroids[:, None, :]).abs()
    assert torch.equal(distance.gather(2, index[:, :, None]).squeeze(2), distance.min(2).values)


def test_prune_then_kmeans_survives_an_all_zero_layer(tmp_path):
    """A Whisper-started model has all-zero output projections (identity modules); global pruning removes them
    entirely, and k-means must leave such a layer alone rather than fail on an empty set (it once did)."""
    torch.manual_seed(0)
    net = ConformerCTC(preset("tiny", dropout=0.0)).eval()
    with torch.no_grad():
        net.blocks[0].conv.pointwise2.weight.zero_()
    compressed = apply_recipe(net, parse_recipe("prune:sparsity=0.5+kmeans:clusters=16+int8"))
    folder = save_load(tmp_path, compressed, "prune:sparsity=0.5+kmeans:clusters=16+int8")
    reloaded, _ = load_model(folder)
    x = torch.randn(1, 120, 80)
    assert torch.isfinite(reloaded(x, torch.tensor([120]))[0]).all()


def test_kmeans_1d_matches_sklearn():
    from sklearn.cluster import KMeans

    values = torch.randn(20000) * 0.05
    centroids, idx = kmeans_1d(values, 8, iterations=100)
    ours = float(((centroids[idx] - values) ** 2).sum())
    x = values.numpy()[:, None].astype(np.float64)
    sk = KMeans(8, n_init=1, init=np.linspace(x.min(), x.max(), 8)[:, None], max_iter=300, tol=0).fit(x)
    assert ours <= sk.inertia_ * 1.001
    assert torch.all(centroids[1:] >= centroids[:-1])


def test_kmeans_1d_assigns_every_value_to_its_nearest_centroid_ties_included():
    """Many exactly equal values (rounded weights): the sort may order ties any way, the assignment may not care.
    Every value lands on its nearest centroid (as torch.bucketize on the midpoints would put it)."""
    from compression.methods import sort_order

    values = (torch.randn(30000) * 20).round() / 400  # about 150 distinct values
    perm = sort_order(values)
    assert torch.equal(values[perm], values.sort().values)
    for weights in (None, torch.rand(30000)):
        centroids, idx = kmeans_1d(values, 16, iterations=50, weights=weights)
        nearest = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        assert torch.equal(idx, nearest)
        again, _ = kmeans_1d(values, 16, iterations=50, weights=weights, perm=perm)  # a kept sort
        assert torch.equal(again, centroids)


def test_kth_smallest_is_torchs_kthvalue():
    from compression.methods import kth_smallest

    values = torch.cat([torch.randn(5000).abs(), torch.zeros(3000), torch.full((500,), 0.25)])[torch.randperm(8500)]
    for k in (1, 2999, 3000, 3001, 6000, 8500):
        assert float(kth_smallest(values, k)) == float(values.kthvalue(k).values)


def test_int4_and_ternary_packing(tmp_path, model):
    from safetensors.torch import load_file

    for text, bits in (("int4:group=32", 4), ("ternary", 2)):
        compressed = apply_recipe(model, parse_recipe(text))
        folder = save_load(tmp_path, compressed, text)
        stored, layers = load_file(os.path.join(folder, "model.safetensors")), read_manifest(folder)["layers"]
        for name, m in target_layers(model, ("subsampling.conv1", "head")):
            n = m.weight.numel()
            assert stored_fields(stored, layers, name)["codes"].numel() == packed_nbytes(n, bits)
            scales = stored[f"{name}.weight.scales"]
            rows = m.weight.shape[0]
            cols = m.weight[0].numel()
            assert scales.numel() == (rows * math.ceil(cols / 32) if bits == 4 else rows)
    for w in compressed_weights(apply_recipe(model, parse_recipe("ternary"))).values():
        w2 = w.reshape(w.shape[0], -1)
        for row in w2:
            assert len(torch.unique(row)) <= 3
            assert torch.allclose(row.abs()[row != 0], row.abs().max().expand(int((row != 0).sum())))


def test_int8_runs_on_int8_kernels(model):
    """gptq (the default) rounds activations per row where torch._int_mm is exact; rtn keeps torch's per-call
    dynamic kernel, as the data-free twin."""
    runtime = to_runtime(apply_recipe(model, parse_recipe("int8")))
    per_row = [m for m in runtime.modules() if isinstance(m, PerRowInt8Linear)]
    assert per_row if int_mm_is_exact() else not per_row
    assert isinstance(runtime.head, nn.Linear)  # the head stays in higher precision by default
    naive = to_runtime(apply_recipe(model, parse_recipe("int8:algo=rtn")))
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in naive.modules())
    assert not any(isinstance(m, PerRowInt8Linear) for m in naive.modules())


def _per_row_reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Symmetric per-row int8 activations x int8 weights, in float64 numpy (round half to even, as torch)."""
    row_scale = (np.abs(x).max(axis=1, keepdims=True) / 127.0).astype(np.float32)
    return (np.round(x / row_scale) @ codes.T.astype(np.float64)) * row_scale * scales + bias


def test_per_row_int8_linear_is_the_per_row_product_and_beats_one_scale_per_call():
    from compression.quantize import int8_quantize, quantized_int8_linear

    torch.manual_seed(3)
    linear = nn.Linear(40, 24)
    x = torch.randn(2, 9, 40)
    x[0, 4] *= 40.0  # one loud frame
    codes, scales = int8_quantize(linear.weight.detach())
    per_row = quantized_int8_linear(linear, codes, scales, activations="per-row")
    if not int_mm_is_exact():
        pytest.skip("torch._int_mm is not exact on this CPU: per-row falls back (next test)")
    assert isinstance(per_row, PerRowInt8Linear)
    with torch.no_grad():
        got = per_row(x)
        per_call = quantized_int8_linear(linear, codes, scales, activations="full")(x)
    assert got.shape == (2, 9, 24)
    expected = _per_row_reference(x.reshape(-1, 40).numpy(), codes.numpy(), scales.numpy(),
                                  linear.bias.detach().numpy())
    assert np.allclose(got.reshape(-1, 24).numpy(), expected, rtol=1e-5, atol=1e-5)
    exact = x @ (codes.float() * scales[:, None]).T + linear.bias.detach()
    quiet = torch.ones(2, 9, dtype=torch.bool)
    quiet[0, 4] = False
    assert (got - exact)[quiet].abs().max() < 0.2 * (per_call - exact)[quiet].abs().max()
    assert torch.equal(per_row(torch.zeros(3, 40)), linear.bias.detach().expand(3, -1))  # a silent frame: no NaN


def test_per_row_falls_back_with_a_warning_where_int_mm_is_not_exact(monkeypatch):
    import compression.quantize as quantize

    monkeypatch.setattr(quantize, "int_mm_is_exact", lambda: False)
    with pytest.warns(UserWarning, match="not exact on this CPU"):
        module = quantize.quantized_int8_linear(nn.Linear(16, 8), activations="per-row")
    assert type(module).__module__.startswith("torch.ao.nn.quantized") or "FullRange" in type(module).__name__


def test_int8_activations_travel_in_the_artifact(tmp_path, model, features):
    from compression.artifact import int8_activations, read_manifest

    for recipe, expected in (("int8", "per-row"), ("int8:activations=full", "full"), ("int8:algo=rtn", "reduced")):
        folder = save_load(tmp_path, apply_recipe(model, parse_recipe(recipe)), recipe)
        entries = [e for e in read_manifest(folder)["layers"].values() if e["int8_runtime"]]
        assert entries and {int8_activations(e) for e in entries} == {expected}
    assert int8_activations({"int8_full_range": True}) == "full"  # artifacts written before per-row
    with pytest.raises(SettingsError, match="int8 activations must be one of reduced, full, per-row"):
        parse_recipe("int8:activations=per-channel")


def test_an_int8_artifact_loads_onto_its_codes_without_float_weights(tmp_path, model, features, monkeypatch):
    """Its int8 layers never get a float weight on load (a float copy per layer, freed again, kept the FP32
    model's memory resident: 209 against 86 MB after loading the shipped int8 artifact); outputs unchanged."""
    import compression.artifact as artifact

    for recipe in ("int8", "int8:algo=rtn", "prune:sparsity=0.5+kmeans:clusters=4+int8"):
        compressed = apply_recipe(model, parse_recipe(recipe))
        expected = to_runtime(compressed)(*features)[0]
        folder = save_load(tmp_path / recipe.replace(":", "_"), compressed, recipe)
        dequantized, original = [], artifact.int8_dequantize
        monkeypatch.setattr(artifact, "int8_dequantize", lambda *a: dequantized.append(1) or original(*a))
        loaded, _ = load_model(folder)
        monkeypatch.undo()
        entries = read_manifest(folder)["layers"].values()
        assert any(e["int8_runtime"] for e in entries)
        # only the int8-stored layers that run in float (convolutions) are dequantized
        assert len(dequantized) == sum(e["encoding"] == "int8" and not e["int8_runtime"] for e in entries)
        int8_layers = [m for m in loaded.modules() if is_int8_runtime(m)]
        assert int8_layers and not any(isinstance(m, nn.Linear) and m.weight.numel() == 0 for m in loaded.modules())
        assert torch.allclose(loaded(*features)[0], expected, atol=1e-5)


def test_svd_rank_and_skip(model):
    compressed = apply_recipe(model, parse_recipe("svd:rank=8"))
    lows = [m for m in compressed.modules() if isinstance(m, LowRankLinear)]
    assert lows and all(m.rank == 8 for m in lows)
    full = apply_recipe(model, parse_recipe("svd:energy=1.0"))
    assert not any(isinstance(m, LowRankLinear) for m in full.modules())  # full rank saves nothing: skipped


def test_structured_pruning_gives_a_smaller_plain_model(tmp_path, model, features):
    compressed = apply_recipe(model, parse_recipe("structured:fraction=0.5"))
    assert compressed.cfg.ffn_dim == 128 and compressed.cfg.n_heads == 2 and compressed.cfg.attn_dim == 48
    n_before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in compressed.parameters()) < 0.75 * n_before
    folder = save_load(tmp_path, compressed, "structured:fraction=0.5")
    loaded = load_artifact(folder)
    assert loaded.cfg.ffn_dim == 128
    with torch.no_grad():
        assert torch.equal(loaded(*features)[0], to_runtime(compressed)(*features)[0])


def test_report_of_a_reshaped_chain_leaves_the_error_of_shrunk_layers_blank(model):
    """Structured pruning shrinks ffn2's input as well as ffn1's output: the report still lists every layer,
    with a weight error only where the shape stayed (a pruned weight is not comparable to the dense one)."""
    compressed = apply_recipe(model, parse_recipe("structured:fraction=0.3+prune:sparsity=0.5+int8"))
    assert compressed.cfg.ffn_dim * model.cfg.d_model % model.cfg.ffn_dim  # ffn2's weight cannot be re-viewed
    rows = {r["layer"]: r for r in layer_report(model, compressed)}
    assert len(rows) == 18
    ffn2 = rows["blocks.1.ffn2.linear2"]
    assert ffn2["bytes_after"] < ffn2["bytes_before"] and math.isnan(ffn2["rel_error"])
    assert 0 < rows["blocks.1.conv.pointwise2"]["rel_error"] < 1


def test_bad_settings_fail_before_work():
    for bad, message in [("prune:sparsity=1.0", "sparsity"), ("prune:sparsity=-0.1", "sparsity"),
                         ("svd:rank=0", "rank"), ("svd", "exactly one"), ("kmeans:clusters=1", "clusters"),
                         ("kmeans:clusters=300", "clusters"), ("int8+int8", "twice"), ("warp", "Unknown"),
                         ("int8+prune:sparsity=0.5", "before"), ("kmeans:clusters=16+int4", "cannot follow"),
                         ("prune:density=0.5", "no setting"), ("prune:sparsity=abc", "not a valid"),
                         ("int4:group=2", "group"), ("", "empty")]:
        with pytest.raises(SettingsError, match=message):
            parse_recipe(bad)


def test_recipe_file_and_report(tmp_path, model):
    path = tmp_path / "r.json"
    path.write_text('{"name": "mine", "steps": [{"method": "prune", "sparsity": 0.5}, {"method": "int8"}], '
                    '"skip": ["head", "subsampling.*"]}')
    recipe = parse_recipe(str(path))
    assert recipe.methods == ["prune", "int8"] and recipe.skip == ("head", "subsampling.*")
    compressed = apply_recipe(model, recipe)
    rows = layer_report(model, compressed)
    assert rows and all(r["bytes_after"] < r["bytes_before"] for r in rows)
    assert not any(r["layer"].startswith("subsampling") for r in rows)
    assert "ratio" in format_report(rows)


def test_bit_packing_round_trip():
    for bits in range(1, 9):
        codes = torch.randint(0, 2 ** bits, (1001,))
        packed = pack_bits(codes, bits)
        assert packed.numel() == packed_nbytes(1001, bits)
        assert torch.equal(unpack_bits(packed, bits, 1001), codes)


def test_row_codebook_grids_hold_at_any_scale():
    """Each row's 16 centroids on its 256-level grid: within half a step of where k-means put them (plus the fp16
    rounding of the two ends), rounding again changes nothing, and a flat row stays flat; a row spanning 1e-5
    (its step below fp16's smallest normal) as well as one spanning 1."""
    from compression.methods import round_row_centroids

    torch.manual_seed(0)
    scales = torch.tensor([3.0, 1.0, 1e-2, 1e-3, 1e-5, 0.0])
    rows = torch.sort(torch.randn(6, 16), 1).values * scales[:, None]
    rounded = round_row_centroids(rows, "uint8")
    ends = rows[:, [0, -1]]
    slack = (ends - ends.half().float()).abs().amax(1) + (rows[:, -1] - rows[:, 0]) / 510 + 1e-12
    assert bool(((rounded - rows).abs() <= slack[:, None]).all())
    assert torch.equal(round_row_centroids(rounded, "uint8"), rounded)
    assert torch.equal(rounded[-1], torch.zeros(16))
    with pytest.raises(ValueError, match="stored as one of"):
        round_row_centroids(rows, "int8")


def test_an_artifact_of_a_newer_format_is_refused(tmp_path, model):
    import json
    from asr_core.errors import CheckpointError

    folder = save_load(tmp_path, apply_recipe(model, parse_recipe("int8:algo=rtn")), "int8:algo=rtn")
    path = os.path.join(folder, "compression.json")
    manifest = json.load(open(path))
    assert manifest["version"] == 2
    json.dump({**manifest, "version": 3}, open(path, "w"))
    with pytest.raises(CheckpointError, match="format version 3, newer"):
        load_artifact(folder)


def test_kmeans_centroid_bits_are_checked():
    with pytest.raises(SettingsError, match="centroid_bits must be 8 or 16"):
        parse_recipe("kmeans:centroid_bits=4")
    with pytest.raises(SettingsError, match="codebook=row"):
        parse_recipe("kmeans:codebook=layer,centroid_bits=8")


def test_huffman_coding_is_lossless_and_only_kept_when_smaller():
    from compression.packing import huffman_decode, huffman_encode

    skewed = torch.distributions.Categorical(torch.tensor([1, 4, 16, 40, 16, 4, 1, 1.0])).sample((20000,))
    packed = pack_bits(skewed, 3)
    coded = huffman_encode(packed)
    assert coded is not None and coded.numel() < 0.9 * packed.numel()
    assert torch.equal(huffman_decode(coded, packed.numel()), packed)
    signed = torch.randint(-3, 4, (5000,), dtype=torch.int8)
    assert torch.equal(huffman_decode(huffman_encode(signed), 5000, torch.int8), signed)
    assert huffman_encode(torch.randint(0, 256, (5000,), dtype=torch.uint8)) is None  # uniform: nothing to gain
    for damaged, nbytes in ((coded[: coded.numel() // 2], packed.numel()),  # cut short
                            (coded, packed.numel() - 1), (coded, packed.numel() + 1),  # not the layer's length
                            (torch.cat([coded, coded[:10]]), packed.numel())):  # bytes after the stream
        with pytest.raises(ValueError, match="corrupt"):
            huffman_decode(damaged, nbytes)


def test_an_n_m_mask_is_stored_huffman_coded(tmp_path, model):
    """2 kept of every 4: 6 choices a group, log2(6) = 2.58 of its 4 bits; the coded mask decodes to the same."""
    from safetensors.torch import load_file

    compressed = apply_recipe(model, parse_recipe("prune:pattern=2:4,algo=magnitude"))
    folder = save_load(tmp_path, compressed, "prune:pattern=2:4,algo=magnitude")
    stored, layers = load_file(os.path.join(folder, "model.safetensors")), read_manifest(folder)["layers"]
    for name, entry in layers.items():
        plain = stored_fields(stored, layers, name)
        assert "mask" in entry["huffman"] and stored[f"{name}.weight.mask"].numel() < 0.8 * plain["mask"].numel()
        zeros = compressed.get_submodule(name).weight.detach().reshape(-1, 4) == 0
        assert torch.equal(torch.from_numpy(np.unpackbits(plain["mask"].numpy())[: zeros.numel()]).bool(),
                           ~zeros.reshape(-1))


def test_a_corrupt_huffman_coded_layer_is_a_checkpoint_error(tmp_path, model):
    from safetensors.torch import load_file, save_file
    from asr_core.errors import CheckpointError

    folder = save_load(tmp_path, apply_recipe(model, parse_recipe("int4:group=32")), "int4:group=32")
    layers = read_manifest(folder)["layers"]
    name = next(n for n, e in layers.items() if "codes" in e.get("huffman", ()))
    stored = load_file(os.path.join(folder, "model.safetensors"))
    key = f"{name}.weight.codes"
    stored[key] = stored[key][: stored[key].numel() // 2].clone()
    save_file(stored, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_artifact(folder)


def test_bit_packing_keeps_the_stored_layout():
    """Artifacts already written hold one most-significant-bit-first stream of fields: the bit planes of the
    codes through numpy's packbits. The packer must write (and read) exactly those bytes, for every length."""
    import numpy as np

    for bits in range(1, 8):
        for n in (1, 7, 8, 9, 23, 1000):
            codes = torch.randint(0, 2 ** bits, (n,))
            planes = (codes.numpy()[:, None] >> np.arange(bits - 1, -1, -1)) & 1
            stored = torch.from_numpy(np.packbits(planes.astype(np.uint8).reshape(-1)))
            assert torch.equal(pack_bits(codes, bits), stored), (bits, n)
            assert torch.equal(unpack_bits(stored, bits, n), codes), (bits, n)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0, 16]), 4)


def test_finetuning_keeps_every_constraint(model, dev_dir):
    """A few real optimizer steps through asr_core's training loop: masks, codebooks and grids hold."""
    from asr_core.data import load_utterances
    from compression.compress import finetune

    utts = load_utterances(str(dev_dir / "1272"), limit=4)
    for text, check in [
        ("prune:sparsity=0.6,scope=layer", lambda w: abs(float((w == 0).float().mean()) - 0.6) < 0.02),
        ("kmeans:clusters=4,codebook=layer", lambda w: len(torch.unique(w)) <= 4),
        ("kmeans:clusters=4", lambda w: all(len(torch.unique(r)) <= 4 for r in w.reshape(w.shape[0], -1))),
        ("ternary", lambda w: all(len(torch.unique(r)) <= 3 for r in w.reshape(w.shape[0], -1))),
    ]:
        compressed = apply_recipe(model, parse_recipe(text))
        before = {k: v.clone() for k, v in compressed_weights(compressed).items()}
        finetune(compressed, CharTokenizer(), utts, [], steps=3, lr=1e-2, batch_seconds=60, progress=False)
        after = compressed_weights(compressed)
        assert any(not torch.equal(before[k], after[k]) for k in after), text  # it did train
        assert all(check(w) for w in after.values()), text


def test_recovery_finetuning_keeps_frozen_blocks_frozen(dev_dir):
    """compress --finetune-* with freeze_layers (the shipped baseline's config says 4): the frozen blocks' weights
    and the constraint on them stay; the blocks above learn."""
    from asr_core.data import load_utterances
    from compression.compress import finetune

    torch.manual_seed(0)
    net = apply_recipe(ConformerCTC(preset("tiny", dropout=0.1)), parse_recipe("int4:group=32"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    utts = sorted(load_utterances(str(dev_dir / "1272")), key=lambda u: u.duration)[:2]
    finetune(net, CharTokenizer(), utts, [], steps=2, lr=3e-3, batch_seconds=100, freeze_layers=1, progress=False)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert not any(k.startswith(("subsampling.", "blocks.0.")) for k in changed), sorted(changed)
    assert any(k.startswith("blocks.1.") for k in changed)
