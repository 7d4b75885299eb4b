"""Samples -> text with any model folder, chunking long audio so memory stays bounded."""
from __future__ import annotations

import numpy as np
import torch

from .audio import SAMPLE_RATE, AudioSource, load_audio
from .checkpoint import default_model_dir, load_model
from .decoding import CHUNK_SECONDS, CONTEXT_SECONDS, GreedyDecoder, make_decoder, windows
from .features import log_mel
from .text import CharTokenizer


class Transcriber:
    """Holds one model and turns audio into CTC log-probs and text.

    ``log_probs(samples)`` splits audio longer than ``chunk_seconds`` into windows that overlap by
    ``2 * context_seconds``, keeps the centre of each window's output frames, and concatenates them before
    decoding, so words cut at a window edge are recognised from a window that holds them whole.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: CharTokenizer, *, chunk_seconds: float = CHUNK_SECONDS,
                 context_seconds: float = CONTEXT_SECONDS, decoder=None):
        if chunk_seconds <= 4 * context_seconds:
            raise ValueError("chunk_seconds must exceed four times context_seconds")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.greedy = GreedyDecoder(tokenizer)
        self.decoder = decoder or self.greedy  # any callable (T', V) log-probs -> text
        self.cfg = model.cfg
        self.chunk = int(chunk_seconds * SAMPLE_RATE)
        self.context = int(context_seconds * SAMPLE_RATE)
        # samples per output frame: 10 ms hop x subsampling
        self.samples_per_frame = self.cfg.features.hop_length * self.cfg.subsampling_factor

    @classmethod
    def from_folder(cls, folder: str | None = None, *, decoding: str = "auto", lm_folder: str | None = None,
                    beam_settings=None, **kwargs) -> "Transcriber":
        """``decoding``: "greedy"; "lm" (beam search with the LM in ``lm_folder`` or the model folder);
        "auto" (the LM where the folder ships one, else greedy)."""
        model, tokenizer = load_model(folder)
        decoder = make_decoder(tokenizer, lm_folder or folder or default_model_dir(), decoding, beam_settings)
        return cls(model, tokenizer, decoder=decoder, **kwargs)

    @torch.inference_mode()
    def _window_log_probs(self, samples: np.ndarray) -> torch.Tensor:
        feats = log_mel(samples, self.cfg.features)
        log_probs, _ = self.model(feats[None], torch.tensor([feats.shape[0]]))
        return log_probs[0]

    def log_probs(self, samples: np.ndarray) -> torch.Tensor:
        """(n_samples,) 16 kHz -> (T', V) log-probs for the whole clip."""
        pieces = []
        for start, end, a, b in windows(len(samples), self.chunk, self.context, self.samples_per_frame):
            window = self._window_log_probs(samples[start:end])
            pieces.append(window if b == -1 else window[a:b])
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def transcribe(self, source: AudioSource, **load_kwargs) -> str:
        samples = source if isinstance(source, np.ndarray) and source.dtype == np.float32 and source.ndim == 1 \
            else load_audio(source, **load_kwargs)
        return self.decoder(self.log_probs(samples))
