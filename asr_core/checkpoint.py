"""Model folders: ``model.safetensors`` + ``config.json`` (+ ``vocab.json``). Loading never unpickles.

One loader for everything that can be a model: :func:`load_model` dispatches on the folder's format
(:func:`folder_format`). Formats other than the plain checkpoint (compressed artifacts, ONNX folders) register
their loader under the ``edge_asr.model_formats`` entry-point group (see pyproject.toml), so ``asr_core`` never
imports the packages above it and still opens every folder they write.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointError
from .folders import CONFIG, read_config, write_config  # re-exported: one reader of config.json
from .model import ConformerCTC
from .provenance import Provenance, file_sha256, read_provenance
from .text import CharTokenizer
from .weight_int8 import int8_dequantize, int8_quantize

FORMAT = "edge-asr-checkpoint"
DEFAULT_MODEL_NAME = "conformer-ctc-whisper-base"
WEIGHTS, VOCAB, MANIFEST = "model.safetensors", "vocab.json", "compression.json"
INT8_SCALE = ":int8_scale"  # suffix of the per-output-channel scales of an int8-stored matrix


def default_model_dir() -> str:
    """$EDGE_ASR_MODEL, else the baseline shipped in the repository's ``checkpoints/``."""
    if os.environ.get("EDGE_ASR_MODEL"):
        return os.environ["EDGE_ASR_MODEL"]
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = root / "checkpoints" / DEFAULT_MODEL_NAME
        if candidate.is_dir():
            return str(candidate)
    return str(Path(__file__).resolve().parents[1] / "checkpoints" / DEFAULT_MODEL_NAME)


def folder_bytes(folder: str) -> int:
    """Bytes on disk of every file in a model folder (what a device would have to store)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def int8_stored_names(model: ConformerCTC) -> list[str]:
    """State-dict names of the matrices (2-D and up) of the conv stem and the first ``cfg.int8_stored_layers``
    blocks (none when 0): what a checkpoint stores as weight-only int8."""
    layers = model.cfg.int8_stored_layers
    if not layers:
        return []
    prefixes = ("subsampling.", *(f"blocks.{i}." for i in range(layers)))
    return [k for k, v in model.state_dict().items() if k.startswith(prefixes) and v.dim() >= 2]


def round_to_int8_storage(model: ConformerCTC, layers: int | None = None) -> int:
    """Round, in place, the tensors that ``cfg.int8_stored_layers`` stores as int8 to what they load as; returns
    how many. Training with that part frozen then learns on exactly the values that are saved. ``layers`` first
    sets ``cfg.int8_stored_layers`` (validated by the config: 0 to n_layers), as every writer that changes the
    storage needs both steps."""
    if layers is not None:
        model.cfg = dataclasses.replace(model.cfg, int8_stored_layers=layers)
    names = int8_stored_names(model)
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name in names:
            params[name].copy_(int8_dequantize(*int8_quantize(params[name].detach())))
    return len(names)


def save_model(folder: str, model: ConformerCTC, tokenizer: CharTokenizer, *, half: bool = False,
               int8: bool = True, extra: dict | None = None, provenance: Provenance | None = None) -> None:
    """Write weights (fp16 when ``half``), config and vocabulary; ``extra`` goes into config.json as is, and
    ``provenance`` under "provenance" (see :mod:`asr_core.provenance`).

    The matrices ``cfg.int8_stored_layers`` names are stored as int8 codes under their own name plus fp16 scales
    under ``NAME + INT8_SCALE`` (``int8=False``: as the rest, e.g. to measure full-precision bytes)."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if int8:  # from the fp32 values, before any halving: re-saving a rounded model must give the same codes
        for name in int8_stored_names(model):
            codes, scales = int8_quantize(state[name].float())
            state[name], state[name + INT8_SCALE] = codes, scales.half()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    config = {"format": FORMAT, "version": 1, "model": model.cfg.to_dict(), **(extra or {})}
    write_model_files(folder, state, config, tokenizer, provenance)


def write_model_files(folder: str, tensors: dict[str, torch.Tensor], config: dict, tokenizer: CharTokenizer,
                      provenance: Provenance | None = None) -> None:
    """The files every model folder has: weights (written to a temporary name and renamed, so a crash never
    leaves a half-written checkpoint), config.json (with ``provenance`` signed by the weights' sha256) and the
    vocabulary. Checkpoints and compressed artifacts both write through here."""
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, os.path.join(folder, WEIGHTS))
    if provenance is not None:
        signed = dataclasses.replace(provenance, weights_sha256=file_sha256(os.path.join(folder, WEIGHTS)))
        config = {**config, "provenance": signed.to_dict()}
    write_config(folder, config)
    with open(os.path.join(folder, VOCAB), "w") as f:
        f.write(tokenizer.to_json())


def read_tokenizer(folder: str) -> CharTokenizer:
    path = os.path.join(folder, VOCAB)
    if not os.path.exists(path):
        return CharTokenizer()
    with open(path) as f:
        return CharTokenizer.from_json(f.read())


def read_weights(folder: str, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as stored (a compressed artifact's packed codes stay packed)."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no {name}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err})") from None


def read_state(folder: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict: int8-stored matrices (see :func:`save_model`) dequantized, the rest as stored."""
    state = read_weights(folder)
    for key in [k for k in state if k.endswith(INT8_SCALE)]:
        name = key[: -len(INT8_SCALE)]
        if name not in state or state[name].dtype != torch.int8:
            raise CheckpointError(f"{folder}: {key} has no int8 tensor {name} beside it")
        state[name] = int8_dequantize(state[name], state.pop(key))
    return state


def model_config(config: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"config.json does not describe a model ({err})") from None


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> ConformerCTC:
    """A model in eval mode holding ``state`` (fp16 weights widen to fp32); mismatches raise CheckpointError."""
    model = ConformerCTC(cfg)
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    wrong = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            "Weights do not match config.json: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, wrong shape {sorted(wrong)[:3]}"
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


ARTIFACT, ONNX, CHECKPOINT = "artifact", "onnx", "checkpoint"
ONNX_FILE = "model.onnx"


def folder_format(folder: str) -> str:
    """"artifact" (a ``compression.json`` manifest), "onnx" (a ``model.onnx``) or "checkpoint". The one test of
    what a model folder holds; raises CheckpointError when it is not a model folder at all."""
    read_config(folder)
    if is_artifact(folder):
        return ARTIFACT
    if os.path.exists(os.path.join(folder, ONNX_FILE)):
        return ONNX
    return CHECKPOINT


def provenance_matches_weights(folder: str) -> bool | None:
    """Whether the folder's provenance was written for the model.safetensors beside it (None: no record, or a
    record without a digest)."""
    record = read_provenance(read_config(folder))
    if record is None or not record.weights_sha256:
        return None
    return record.weights_sha256 == file_sha256(os.path.join(folder, WEIGHTS))


def is_artifact(folder: str) -> bool:
    """Whether ``folder`` is a compressed artifact (False for anything else, including a missing folder)."""
    return os.path.isdir(folder) and os.path.exists(os.path.join(folder, MANIFEST))


@functools.cache
def format_loaders() -> dict[str, Callable]:
    """Loaders registered by installed packages: format name -> ``load(folder, **options) -> model``."""
    return {ep.name: ep for ep in entry_points(group="edge_asr.model_formats")}


def _load_registered(kind: str, folder: str, **options) -> torch.nn.Module:
    entry = format_loaders().get(kind)
    if entry is None:
        raise CheckpointError(f"{folder} is an {kind} folder, but no installed package opens that format "
                              f"(reinstall with `pip install -e .`)")
    return entry.load()(folder, **options)


def load_model(folder: str | None = None, **options) -> tuple[torch.nn.Module, CharTokenizer]:
    """Open any model folder: a trained checkpoint, a compressed artifact or an ONNX export. Returns (model in eval
    mode, tokenizer). ``options`` go to the format's loader (e.g. ``threads`` for an ONNX Runtime session)."""
    folder = folder or default_model_dir()
    kind = folder_format(folder)
    tokenizer = read_tokenizer(folder)
    if kind != CHECKPOINT:
        return _load_registered(kind, folder, **options), tokenizer
    config = read_config(folder)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{folder}/config.json has format {config.get('format')!r}, expected {FORMAT!r}")
    return build_model(model_config(config), read_state(folder)), tokenizer
