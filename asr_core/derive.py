"""Models made from other models' weights without training: weighted averages (model soups) and WiSE-FT
interpolation back towards Whisper. Each returns the model and the provenance of what it made."""
from __future__ import annotations

import os
import shutil

from safetensors import safe_open

from .checkpoint import WEIGHTS, is_artifact, load_model, read_config, round_to_int8_storage, save_model
from .errors import SettingsError
from .model import ConformerCTC
from .provenance import Provenance, current_command, parent
from .text import CharTokenizer
from .training import average_states


def stored_in_half(folder: str) -> bool:
    """Whether every tensor of the folder's weights file is fp16, or int8 codes of an int8-stored matrix (so a
    derived model is stored the same way)."""
    with safe_open(os.path.join(folder, WEIGHTS), "pt") as f:
        return all(f.get_slice(k).get_dtype() in ("F16", "I8") for k in f.keys())


def copy_decoding_files(source: str, out: str) -> None:
    """The word LM and decoding.json travel with a model derived from ``source``."""
    from .beam_search import DECODING_FILE, LM_FILE

    for name in (LM_FILE, DECODING_FILE):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(out, name))


def _checkpoint(folder: str, what: str) -> tuple[ConformerCTC, CharTokenizer]:
    if is_artifact(folder):
        raise SettingsError(f"{folder} is a compressed artifact; {what} the checkpoint it came from instead")
    return load_model(folder)  # fp32, whatever the file stores


def normalized_weights(weights: list[float] | None, n: int) -> list[float]:
    weights = weights or [1.0] * n
    if len(weights) != n or min(weights) < 0 or sum(weights) <= 0:
        raise SettingsError(f"averaging needs one non-negative weight per model ({n}), not all zero; got {weights}",
                            setting="weights")
    return [w / sum(weights) for w in weights]


def average_folders(folders: list[str], weights: list[float] | None = None, int8_layers: int | None = None):
    """Weighted average of models of one config -> (model, tokenizer, provenance, half). One folder with
    ``int8_layers`` re-stores it. fp16 out only if every input was fp16; the int8 storage is the first model's
    unless ``int8_layers`` says."""
    if len(folders) < 2 and int8_layers is None:
        raise SettingsError("give at least two model folders to average (or one with int8_layers to store it anew)",
                            setting="int8_layers")
    weights = normalized_weights(weights, len(folders))
    models = [_checkpoint(folder, "average") for folder in folders]
    first, tokenizer = models[0]
    shape = lambda cfg: {**cfg.to_dict(), "int8_stored_layers": None}  # storage only: the weights load as floats
    for folder, (model, tok) in zip(folders[1:], models[1:]):
        if shape(model.cfg) != shape(first.cfg) or tok.to_json() != tokenizer.to_json():
            raise SettingsError(f"{folder} has another shape or vocabulary than {folders[0]}: only models of one "
                                "config can be averaged")
    first.load_state_dict(average_states([m.state_dict() for m, _ in models], weights))
    details = {"weights": [round(w, 6) for w in weights]}
    if int8_layers is not None:
        round_to_int8_storage(first, int8_layers)  # what the file will hold, whatever each input stored
        details["int8_layers"] = int8_layers
    parents = [parent(f, read_config(f), weight=round(w, 6)) for f, w in zip(folders, weights)]
    record = Provenance("average", current_command(), parents, {}, details)
    return first, tokenizer, record, all(stored_in_half(f) for f in folders)


def wise_ft_folder(folder: str, init_from: str | None, weight: float, lower_weight: float | None = None):
    """Move a Whisper-initialised model ``weight`` of the way back to Whisper's weights (``lower_weight`` for the
    stem and lower half) -> (model, tokenizer, provenance, half, tensors moved)."""
    from .whisper_init import packaged_whisper_for, resolve_whisper_source, wise_ft

    model, tokenizer = _checkpoint(folder, "interpolate")
    init_from = init_from or packaged_whisper_for(model)
    n = wise_ft(model, resolve_whisper_source(init_from), weight, lower_weight)
    details = {"init": init_from, "weight": weight, "tensors": n,
               "lower_weight": weight if lower_weight is None else lower_weight}
    record = Provenance("wise-ft", current_command(), [parent(folder, read_config(folder))], {}, details)
    return model, tokenizer, record, stored_in_half(folder), n


def check_new_folder(out: str, sources: list[str]) -> None:
    if any(os.path.abspath(s) == os.path.abspath(out) for s in sources):
        raise SettingsError("the output must be a new folder, not one of the models", setting="out")


def save_derived(out: str, sources: list[str], model, tokenizer, record: Provenance, half: bool) -> None:
    """Write a derived model to a new folder, with the first source's LM and decoding settings."""
    check_new_folder(out, sources)
    save_model(out, model, tokenizer, half=half, provenance=record)
    copy_decoding_files(sources[0], out)
