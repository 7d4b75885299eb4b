"""edge-asr core: audio in, log-mel, Conformer-CTC, decoding, data, training, evaluation, checkpoints.

Names are imported on first use (PEP 562), so ``python -m asr_core.lite`` runs on a device without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SAMPLE_RATE": "audio", "load_audio": "audio", "load_model": "checkpoint", "save_model": "checkpoint",
    "FeatureConfig": "config", "ModelConfig": "config", "preset": "config", "AudioError": "errors",
    "CheckpointError": "errors", "EdgeASRError": "errors", "SettingsError": "errors", "ConformerCTC": "model",
    "CharTokenizer": "text", "normalize_text": "text", "Transcriber": "transcribe",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'asr_core' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
