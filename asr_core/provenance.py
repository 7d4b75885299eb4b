"""Where a model folder came from, recorded in its ``config.json`` under ``"provenance"`` and checked on load.

Every writer (train, average, wise-ft, compress, export) records one :class:`Provenance`: the command that made
the folder, the folders it was made from (each with the parent's own record, so the chain can be followed
back), and only metrics measured on *this* folder's weights. Anything a parent measured stays with the parent.
"""
from __future__ import annotations

import datetime
import hashlib
import shlex
import sys
from dataclasses import asdict, dataclass, field

from .errors import CheckpointError

KINDS = ("train", "average", "wise-ft", "compress", "export", "import")


@dataclass
class Provenance:
    kind: str  # one of KINDS
    command: str  # the command line that wrote the folder
    parents: list[dict] = field(default_factory=list)  # {"folder": path, ...: role, weight; "provenance": theirs}
    metrics: dict = field(default_factory=dict)  # name -> {"wer": ..., "data": ..., ...}, measured on this folder
    details: dict = field(default_factory=dict)  # what the writer knows: training progress, weights, recipe
    created: str = ""  # ISO date (UTC)
    weights_sha256: str = ""  # of the model.safetensors written beside it: ties the record to these weights

    def __post_init__(self):
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> "Provenance":
        """Validated like ModelConfig: wrong types or unknown keys raise CheckpointError."""
        if not isinstance(data, dict):
            raise CheckpointError(f"provenance must be an object, got {type(data).__name__}")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise CheckpointError(f"provenance has unknown fields {sorted(unknown)}")
        types = {"kind": str, "command": str, "parents": list, "metrics": dict, "details": dict, "created": str,
                 "weights_sha256": str}
        for name, kind in types.items():
            if name in data and not isinstance(data[name], kind):
                raise CheckpointError(f"provenance.{name} must be {kind.__name__}, got {type(data[name]).__name__}")
        if data.get("kind") not in KINDS:
            raise CheckpointError(f"provenance.kind must be one of {', '.join(KINDS)}, got {data.get('kind')!r}")
        if "command" not in data:
            raise CheckpointError("provenance has no command")
        if not all(isinstance(p, dict) and isinstance(p.get("folder"), str) for p in data.get("parents", [])):
            raise CheckpointError("every provenance parent needs a folder")
        return cls(**data)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_command() -> str:
    """This process's command line, as a user would type it again (``edge-asr ...`` for the console script)."""
    argv = list(sys.argv)
    program = argv[0].rsplit("/", 1)[-1] if argv else "python"
    if program in ("edge-asr", "__main__.py", "edge_asr.py"):
        program = "edge-asr"
    return shlex.join([program, *argv[1:]])


def read_provenance(config: dict) -> Provenance | None:
    """The validated record of a folder's config, or None for folders written before records existed."""
    return Provenance.from_dict(config["provenance"]) if "provenance" in config else None


def parent(folder: str, config: dict, **role) -> dict:
    """A parent entry for ``folder`` (whose config is ``config``), carrying the parent's own record."""
    entry = {"folder": folder, **role}
    record = read_provenance(config)
    if record is not None:
        entry["provenance"] = record.to_dict()
    return entry


def training_details(config: dict) -> dict:
    """How the folder's weights were trained (freeze_layers, ...): from its record, else from the "training"
    section folders written before records existed carry; {} when neither says."""
    record = read_provenance(config)
    if record is not None:
        if "training" in record.details:
            return record.details["training"]
        for entry in record.parents:  # derived models (average, wise-ft) train as their first parent did
            if "provenance" in entry:
                return training_details({"provenance": entry["provenance"]})
        return {}
    return config.get("training", {})
