"""edge-asr core: audio in, log-mel, Conformer-CTC, decoding, data, training, evaluation, checkpoints."""
from .audio import SAMPLE_RATE, load_audio
from .checkpoint import load_model, save_model
from .config import FeatureConfig, ModelConfig, preset
from .errors import AudioError, CheckpointError, EdgeASRError, SettingsError
from .model import ConformerCTC
from .text import CharTokenizer, normalize_text
from .transcribe import Transcriber

__all__ = ["SAMPLE_RATE", "load_audio", "load_model", "save_model", "FeatureConfig", "ModelConfig", "preset",
           "AudioError", "CheckpointError", "EdgeASRError", "SettingsError", "ConformerCTC", "CharTokenizer",
           "normalize_text", "Transcriber"]
__version__ = "0.1.0"
