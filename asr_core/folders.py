"""config.json of a model folder, read and written without torch (the torch-free runner opens folders too)."""
from __future__ import annotations

import json
import os

from .errors import CheckpointError
from .provenance import read_provenance

CONFIG = "config.json"


def write_config(folder: str, config: dict) -> None:
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def read_config(folder: str) -> dict:
    """A model folder's config.json; its provenance record, when it has one, is validated."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"Model folder not found: {folder}")
    path = os.path.join(folder, CONFIG)
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} is not a model folder: it has no {CONFIG}")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    try:
        read_provenance(config)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return config
