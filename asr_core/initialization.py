"""The model a training run starts from: a preset, warm-started from a model folder or Whisper, with the
lower part frozen (and optionally stored as int8) as asked. What ``edge-asr train`` builds before it trains."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from .checkpoint import CONFIG, WEIGHTS, load_model, model_config, read_config, round_to_int8_storage
from .config import preset
from .errors import SettingsError
from .model import ConformerCTC, close_blocks, drop_identity_modules


@dataclass
class ModelInit:
    """How to build the starting model. ``init_from``: None (random), a model folder, or anything
    :func:`asr_core.whisper_init.resolve_whisper_source` accepts (a Whisper folder/file, 'whisper-base')."""

    preset: str = "xs"
    vocab_size: int = 29
    n_layers: int | None = None  # None: the preset's
    dropout: float | None = None
    init_from: str | None = None
    freeze_layers: int = 0
    int8_frozen: bool = False  # store the frozen part as weight-only int8 (rounded before training)
    seed: int = 0


def _is_model_folder(path: str) -> bool:
    return os.path.isdir(path) and all(os.path.exists(os.path.join(path, f)) for f in (CONFIG, WEIGHTS))


def _warm_start_from_folder(model: ConformerCTC, source: str, freeze_layers: int) -> tuple[ConformerCTC, str]:
    donor, _ = load_model(source)
    if donor.cfg.n_layers > model.cfg.n_layers:  # its top blocks would be dropped without a word
        raise SettingsError(f"{source} has {donor.cfg.n_layers} blocks and this preset {model.cfg.n_layers}; "
                            f"ask for {donor.cfg.n_layers} layers", setting="layers")
    # int8 storage stays only while that part stays frozen (re-rounding trained weights would lose them)
    int8 = donor.cfg.int8_stored_layers if freeze_layers >= donor.cfg.int8_stored_layers else 0
    if donor.cfg.transformer_layers or int8:
        # same shape (or its plain blocks would gain random ffn1/conv modules) and the same storage
        model = ConformerCTC(dataclasses.replace(model.cfg, transformer_layers=donor.cfg.transformer_layers,
                                                 int8_stored_layers=int8))
    missing = model.load_state_dict(donor.state_dict(), strict=False)
    note = f"model folder {source} (missing: {len(missing.missing_keys)})"
    grown = close_blocks(model, donor.cfg.n_layers)  # new blocks on top start as identity
    if grown:
        note += f"; blocks {donor.cfg.n_layers}-{model.cfg.n_layers - 1} new, starting as identity"
    return model, note


def _freeze(model: ConformerCTC, init: ModelInit) -> str:
    """Drop the identity modules of frozen blocks (frozen, they would compute zeros forever) and round the
    frozen part to int8 when asked, so the new blocks learn on the values that will be saved."""
    note = ""
    if init.freeze_layers:
        plain = drop_identity_modules(model, init.freeze_layers)
        if plain:  # the donor's plain blocks may reach above the frozen ones (they then train in Whisper's shape)
            note += f"; blocks 0-{plain - 1} plain Transformer blocks (identity ffn1/conv dropped)"
        note += f"; the stem and blocks 0-{init.freeze_layers - 1} frozen"
    if init.int8_frozen:
        if not init.freeze_layers:
            raise SettingsError("int8_frozen stores the frozen part as int8: freeze_layers must be given too",
                                setting="int8_frozen")
        n = round_to_int8_storage(model, init.freeze_layers)
        note += f"; the stem and blocks 0-{init.freeze_layers - 1} stored as int8 ({n} matrices rounded)"
    return note


def initial_model(init: ModelInit) -> tuple[ConformerCTC, str, list[dict]]:
    """(model, a one-line note on how it was initialised, provenance parents)."""
    from .provenance import parent
    from .whisper_init import init_from_whisper, resolve_whisper_source

    if not 0 <= init.freeze_layers:
        raise SettingsError(f"freeze_layers must be >= 0, got {init.freeze_layers}", setting="freeze_layers")
    torch.manual_seed(init.seed)  # the random start of new blocks and the head, not only the run, follows the seed
    overrides = {"vocab_size": init.vocab_size}
    if init.dropout is not None:
        overrides["dropout"] = init.dropout
    if init.n_layers is not None:
        overrides["n_layers"] = init.n_layers
    model, note, parents = ConformerCTC(preset(init.preset, **overrides)), "random", []
    if init.init_from:
        source = resolve_whisper_source(init.init_from)
        if _is_model_folder(source):
            model, note = _warm_start_from_folder(model, source, init.freeze_layers)
            parents = [parent(source, read_config(source), role="init")]
        else:
            note = f"Whisper encoder ({init_from_whisper(model, source)} layers) from {init.init_from}"
            parents = [{"folder": init.init_from, "role": "init (Whisper encoder)"}]
    return model, note + _freeze(model, init), parents


def resumed_model(run_dir: str) -> ConformerCTC:
    """An empty model of the shape a run in ``run_dir`` trains (its weights come from the run's state)."""
    return ConformerCTC(model_config(read_config(os.path.join(run_dir, "last"))))
