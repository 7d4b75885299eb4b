"""An exported ONNX model folder (``compression.export``) run with ONNX Runtime, as a drop-in for ConformerCTC.

:class:`OnnxCTC` has what :class:`asr_core.transcribe.Transcriber` and :func:`asr_core.evaluation.evaluate` use
of a torch model: ``.cfg``, ``.eval()``, ``.parameters()`` (counts only) and
``model(features (B, T, F), lengths (B,)) -> (log_probs (B, T', V), out_lengths (B,))``. Torch tensors in give
torch tensors out; numpy arrays in give numpy arrays out, so the torch-free runner (:mod:`asr_core.lite`)
uses the same class. This module imports neither torch nor onnx at load time (onnxruntime only when a
session is built).
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, SettingsError
from .folders import read_config
from .text import CharTokenizer

ONNX_FORMAT = "edge-asr-onnx"  # the same string as compression.export.ONNX_FORMAT (not imported: torch)
MODEL_FILE, CONFIG_FILE, VOCAB_FILE = "model.onnx", "config.json", "vocab.json"
INSTALL_HINT = 'pip install -e ".[onnx]"'


@functools.cache
def has_int8_dot_product() -> bool | None:
    """Whether this CPU multiplies u8 x s8 exactly in ONNX Runtime's int8 kernels: True on x86 with VNNI
    (AVX512-VNNI or AVX-VNNI) and on 64-bit ARM (its dot-product kernels); False on other x86 CPUs (AVX2 alone:
    MLAS's u8 x s8 kernel sums pairs of products in int16 and saturates); None when it cannot tell (no
    /proc/cpuinfo: not Linux). Read once per process (the studio loads many folders)."""
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return None
    if not flags:
        return None
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni"))


def read_onnx_config(folder: str) -> dict:
    """config.json of an ONNX folder; CheckpointError when missing, unreadable or of another format."""
    config = read_config(folder)
    if config.get("format") != ONNX_FORMAT:
        raise CheckpointError(f"{folder}/{CONFIG_FILE} has format {config.get('format')!r}, expected {ONNX_FORMAT!r}")
    return config


def is_onnx_folder(folder: str) -> bool:
    """Whether ``folder`` holds an exported ONNX model (config.json of format edge-asr-onnx and model.onnx)."""
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            fmt = json.load(f).get("format")
    except (OSError, ValueError, AttributeError):
        return False
    return fmt == ONNX_FORMAT and os.path.isfile(os.path.join(folder, MODEL_FILE))


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise SettingsError(f"running an ONNX model needs onnxruntime, which is not installed: {INSTALL_HINT}") \
            from None
    return onnxruntime


def make_session(path: str, threads: int | None = None, low_memory: bool = False, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (None: ORT's default, one per core), one
    inter-op thread (the graph is a chain, parallelism is inside the matrix products). ``low_memory``: no
    weight prepacking (ORT otherwise keeps a second, kernel-ordered copy of each matrix: measured on the
    shipped baseline, fp32 load 219 -> 135 MB, int8 82 -> 56 MB; see docs for the speed cost).
    ``profile_prefix``: ORT records every node's time, written by ``session.end_profiling()`` to a JSON file
    whose name starts so."""
    ort = _import_ort()
    if not os.path.isfile(path):
        raise CheckpointError(f"{os.path.dirname(path) or '.'} has no {MODEL_FILE}")
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise SettingsError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    if low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path} is truncated or corrupt: ONNX Runtime cannot load it ({first[:300]})") \
            from None


class _Count:
    """Stands in for a parameter where only ``numel()`` is asked (asr_core.model.count_parameters)."""

    def __init__(self, n: int):
        self.n = n

    def numel(self) -> int:
        return self.n


class OnnxCTC:
    """``OnnxCTC(folder, threads=2)``: the model of an ONNX folder behind ConformerCTC's call signature.
    ``low_memory``: see :func:`make_session`."""

    def __init__(self, folder: str, threads: int | None = None, low_memory: bool = False):
        config = read_onnx_config(folder)
        try:
            self.cfg = ModelConfig.from_dict(config["model"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{folder}/{CONFIG_FILE} does not describe a model ({err})") from None
        self.folder, self.threads = folder, threads
        self.onnx_info = config.get("onnx", {})
        if self.onnx_info.get("int8_weights") == "s8" and has_int8_dot_product() is False:
            import warnings

            warnings.warn(f"{folder}: int8 weights exported as s8 run on this CPU (x86 without VNNI) with ONNX "
                          "Runtime's saturating u8 x s8 kernel: results may drift from the torch model's; export "
                          "with --int8-weights u8 for exact integer products (the same speed on such CPUs)",
                          stacklevel=2)
        self.session = make_session(os.path.join(folder, MODEL_FILE), threads, low_memory)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.training = False

    def eval(self) -> "OnnxCTC":
        return self

    def parameters(self):
        """For reports (count_parameters), not training: the float model's parameter count that the export
        recorded (packed int4 bytes would undercount), else one count per stored initializer."""
        if not hasattr(self, "_counts"):
            recorded = self.onnx_info.get("parameters")
            self._counts = [_Count(int(recorded))] if recorded else \
                _initializer_counts(os.path.join(self.folder, MODEL_FILE))
        return iter(self._counts)

    def run(self, features: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """numpy (B, T, F) float32, (B,) int -> log-probs (B, T', V) float32, out lengths (B,) int64.

        The graph is exported for batch 1; a batch runs item by item on its own frames (the model masks
        padding, so that is what the padded batch computes) and is padded back with log-prob 0."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        outs = [self._run_one(features[b: b + 1, : int(n)], lengths[b: b + 1]) for b, n in enumerate(lengths)]
        if len(outs) == 1:
            return outs[0]
        width = max(o[0].shape[1] for o in outs)
        log_probs = np.zeros((len(outs), width, outs[0][0].shape[2]), np.float32)
        for b, (lp, _) in enumerate(outs):
            log_probs[b, : lp.shape[1]] = lp[0]
        return log_probs, np.concatenate([o[1] for o in outs])

    def _run_one(self, features: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_probs, out_lengths = self.session.run(
            self.output_names, {self.input_names[0]: features, self.input_names[1]: lengths})
        return log_probs, out_lengths.astype(np.int64)

    def __call__(self, features, lengths):
        """Torch tensors in -> torch tensors out (Transcriber, evaluation); numpy in -> numpy out."""
        if isinstance(features, np.ndarray):
            return self.run(features, np.asarray(lengths))
        import torch  # only reached when the caller already uses torch

        log_probs, out_lengths = self.run(features.detach().cpu().float().numpy(),
                                          np.asarray(lengths.detach().cpu()))
        return torch.from_numpy(log_probs), torch.from_numpy(out_lengths)


def _initializer_counts(path: str) -> list[_Count]:
    try:
        import onnx
    except ImportError:
        return []
    proto = onnx.load(path, load_external_data=False)
    return [_Count(int(np.prod(init.dims))) for init in proto.graph.initializer]


def read_vocab(folder: str) -> CharTokenizer:
    path = os.path.join(folder, VOCAB_FILE)
    if not os.path.exists(path):
        return CharTokenizer()
    try:
        with open(path) as f:
            return CharTokenizer.from_json(f.read())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err})") from None


def load_onnx_model(folder: str, threads: int | None = None, low_memory: bool = False
                    ) -> tuple[OnnxCTC, CharTokenizer]:
    """An ONNX model folder -> (OnnxCTC with ``threads`` intra-op threads, tokenizer)."""
    model = OnnxCTC(folder, threads, low_memory)
    tokenizer = read_vocab(folder)
    if len(tokenizer) != model.cfg.vocab_size:
        raise CheckpointError(f"{folder}: vocab.json has {len(tokenizer)} tokens, the model {model.cfg.vocab_size}")
    return model, tokenizer


def load_onnx_folder(folder: str, threads: int | None = None, low_memory: bool = False, **_options) -> OnnxCTC:
    """The loader ``asr_core.checkpoint.load_model`` calls for an ONNX folder (entry point
    ``edge_asr.model_formats: onnx``); ``threads``: ORT intra-op threads. Other options do not apply."""
    return OnnxCTC(folder, threads, low_memory)
