"""The shape of the codebase, pinned: imports run one way, asr_core's functions stay short, every model
folder's provenance is checked on load and the shipped one describes the weights beside it."""
import ast
import json
import subprocess
import sys

import pytest

from asr_core.checkpoint import provenance_matches_weights, read_config
from asr_core.errors import CheckpointError
from asr_core.provenance import Provenance, read_provenance
from conftest import REPO

ABOVE_ASR_CORE = ("compression", "app", "studio", "edge_asr")
SHIPPED = REPO / "checkpoints" / "conformer-ctc-whisper-base"


def test_asr_core_imports_nothing_above_it():
    """The issue's check, in a fresh interpreter: loading the checkpoint module pulls in no upper layer."""
    code = ("import asr_core.checkpoint, sys; "
            "assert not any(m.startswith(('compression', 'app')) for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith(('compression', 'app')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("path", sorted((REPO / "asr_core").glob("*.py")), ids=lambda p: p.name)
def test_no_asr_core_module_imports_an_upper_layer(path):
    """Not even inside a function (the entry-point shim __main__.py is the one exception: it *is* edge-asr)."""
    if path.name == "__main__.py":
        return
    upper = [m for m in _imports(path) if m.split(".")[0] in ABOVE_ASR_CORE]
    assert not upper, f"{path.name} imports {upper}"


def test_compression_does_not_import_the_app():
    for path in sorted((REPO / "compression").glob("*.py")):
        upper = [m for m in _imports(path) if m.split(".")[0] in ("app", "studio", "edge_asr")]
        assert not upper, f"{path.name} imports {upper}"


def test_no_function_in_asr_core_is_over_80_lines():
    long = []
    for path in sorted((REPO / "asr_core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_provenance_is_validated_on_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "edge-asr-checkpoint", "model": {},
                                                      "provenance": {"kind": "train", "command": 3}}))
    with pytest.raises(CheckpointError, match="provenance.command must be str"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"provenance": {"kind": "magic", "command": "x"}}))
    with pytest.raises(CheckpointError, match="provenance.kind"):
        read_config(str(tmp_path))
    record = Provenance("average", "edge-asr average a b", [{"folder": "a", "weight": 0.5}])
    assert Provenance.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_a_written_record_is_tied_to_its_weights(tmp_path):
    from asr_core.checkpoint import save_model
    from asr_core.config import preset
    from asr_core.model import ConformerCTC
    from asr_core.text import CharTokenizer

    save_model(str(tmp_path), ConformerCTC(preset("tiny")), CharTokenizer(), provenance=Provenance("train", "x"))
    assert provenance_matches_weights(str(tmp_path)) is True
    save_model(str(tmp_path), ConformerCTC(preset("tiny", n_layers=1)), CharTokenizer())  # weights without a record
    (tmp_path / "config.json").write_text(json.dumps({**read_config(str(tmp_path)),
                                                      "provenance": {"kind": "train", "command": "x",
                                                                     "weights_sha256": "0" * 64}}))
    assert provenance_matches_weights(str(tmp_path)) is False


def test_the_shipped_config_describes_the_shipped_weights():
    """Its record is of the average that made these weights (not of one of its parents), signed with their
    digest, and its metrics were measured on this folder."""
    config = read_config(str(SHIPPED))
    record = read_provenance(config)
    assert record is not None and record.kind == "average"
    assert provenance_matches_weights(str(SHIPPED)) is True
    assert [p["weight"] for p in record.parents] == [0.4, 0.4, 0.2]
    assert all("checkpoints/conformer-ctc-whisper-base" != p["folder"] for p in record.parents)
    assert {"training", "dev", "selection", "average"}.isdisjoint(config)  # the old, misleading top-level keys
    for metric in record.metrics.values():
        assert metric["folder"] == "checkpoints/conformer-ctc-whisper-base" and metric["command"].startswith("edge-asr")
