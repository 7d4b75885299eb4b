"""Live captions from audio that arrives in blocks: the one engine behind the app's Live tab and ``edge-asr listen``.

The model is not streaming (full attention over a window), so the engine re-decodes a sliding window: the
uncommitted audio since the last commit point, plus ``context_seconds`` of committed audio before it so the words
at the start of the window are heard with what came before (their output frames are dropped, not decoded
again). Text is committed at a pause: the last run of at least ``pause_seconds`` of blank frames (the CTC
model's "nothing said here") that ends ``stable_seconds`` or more before the newest audio, once the window holds
``commit_after_seconds`` of uncommitted audio, so committed words have been re-decoded with right context
several times and no longer change. With no pause by ``max_window_seconds`` the window is cut at its stable part
regardless, which bounds both the compute per update and the memory, however long the session runs.

Committed lines are decoded by the transcriber's decoder (the word-LM beam search, when it has one); the partial
text, re-decoded every step and replaced at the next, by greedy CTC unless ``partials="same"``: the beam search
costs as much as the model's forward pass on each update, and on two cores that is the difference between
captions trailing speech by about one second or by one and a half.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import SAMPLE_RATE, SILENCE_PEAK
from .errors import SettingsError


PARTIALS = ("greedy", "same")


@dataclass
class StreamSettings:
    step_seconds: float = 0.5  # re-decode at most this often (new audio since the last decode)
    context_seconds: float = 1.5  # committed audio re-heard before the window
    commit_after_seconds: float = 4.0  # look for a pause to commit once this much audio is uncommitted
    stable_seconds: float = 1.0  # never commit the newest audio: it can still change
    pause_seconds: float = 0.2  # blank frames that make a pause
    max_window_seconds: float = 12.0  # uncommitted audio never exceeds this (forced cut)
    max_lines: int = 500  # committed lines kept in memory (the oldest dropped first)
    partials: str = "greedy"  # the partial text's decoder: "greedy", or "same" as the committed lines'

    def __post_init__(self):
        if self.partials not in PARTIALS:
            raise SettingsError(f"partials must be one of {', '.join(PARTIALS)}, got {self.partials!r}",
                                setting="partials")
        if not 0 < self.step_seconds <= 5:
            raise SettingsError(f"step_seconds must be in (0, 5], got {self.step_seconds}", setting="step")
        if not self.stable_seconds + 1 < self.max_window_seconds <= 30:
            raise SettingsError("max_window_seconds must exceed stable_seconds + 1 s and be at most 30 s (the "
                                f"model's window), got {self.max_window_seconds}", setting="window")
        if not 0 <= self.context_seconds <= 5:
            raise SettingsError(f"context_seconds must be in [0, 5], got {self.context_seconds}")


@dataclass
class Update:
    """What changed after a block: the committed lines so far, the uncommitted (partial) text, and timings."""

    committed: list[str]
    partial: str
    new_line: str | None = None  # a line committed by this update
    decode_seconds: float = 0.0  # wall time of this update's decode
    window_seconds: float = 0.0  # audio the decode heard
    audio_seconds: float = 0.0  # audio received so far

    @property
    def text(self) -> str:
        return "\n".join([*self.committed, self.partial]).strip()

    @property
    def rtf(self) -> float:
        return self.decode_seconds / self.window_seconds if self.window_seconds else 0.0


@dataclass
class StreamingRecognizer:
    """Feed 16 kHz float32 blocks with :meth:`feed`; :meth:`finish` commits what is left. ``transcriber`` is an
    :class:`asr_core.transcribe.Transcriber` (any model folder, greedy or with the word LM)."""

    transcriber: object
    settings: StreamSettings = field(default_factory=StreamSettings)

    def __post_init__(self):
        self.frame_samples = self.transcriber.samples_per_frame
        self.reset()

    def reset(self) -> None:
        self.context = np.zeros(0, np.float32)  # committed audio kept as left context
        self.pending = np.zeros(0, np.float32)  # uncommitted audio
        self.since_decode = 0
        self.received = 0
        self.committed: list[str] = []
        self.partial = ""
        self.last_decode_seconds = 0.0

    def _seconds(self, n_samples: int) -> float:
        return n_samples / SAMPLE_RATE

    def feed(self, block: np.ndarray) -> Update | None:
        """Add audio; returns an Update when it was time to decode (every ``step_seconds``), else None."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        self.pending = np.concatenate([self.pending, block])
        self.since_decode += len(block)
        self.received += len(block)
        # behind real time (a decode slower than a step), decode less often instead of falling further behind
        if self._seconds(self.since_decode) < max(self.settings.step_seconds, self.last_decode_seconds):
            return None
        return self._decode(final=False)

    def finish(self) -> Update:
        """Decode and commit everything still pending (the end of the stream)."""
        return self._decode(final=True)

    def _decode(self, final: bool) -> Update:
        self.since_decode = 0
        start = time.perf_counter()
        window = np.concatenate([self.context, self.pending])
        if len(self.pending) < SAMPLE_RATE // 10 or float(np.abs(self.pending).max()) < SILENCE_PEAK:
            log_probs = None  # too little, or silence: nothing to hear (and nothing to hallucinate from)
        else:
            log_probs = self.transcriber.log_probs(window)[self._frames(len(self.context)):]
            if not bool((log_probs.argmax(dim=-1) != 0).any()):
                log_probs = None  # the model hears nothing (noise, breath): skip the decoder, above all the LM's
        new_line = None
        cut = self._commit_frame(log_probs, final)
        if cut is not None and log_probs is None:
            self._advance(len(self.pending))  # silence heard: nothing to commit
        elif cut is not None:
            new_line = self.transcriber.decoder(log_probs[:cut]).strip() if cut > 0 else ""
            self._advance(cut * self.frame_samples)
            if new_line:
                self.committed = [*self.committed, new_line][-self.settings.max_lines:]
            log_probs = log_probs[cut:]
        partial_decoder = self.transcriber.greedy if self.settings.partials == "greedy" else self.transcriber.decoder
        self.partial = "" if final or log_probs is None or len(log_probs) == 0 else partial_decoder(log_probs).strip()
        self.last_decode_seconds = time.perf_counter() - start
        return Update(list(self.committed), self.partial, new_line or None, self.last_decode_seconds,
                      self._seconds(len(window)), self._seconds(self.received))

    def _frames(self, n_samples: int) -> int:
        return int(round(n_samples / self.frame_samples))

    def _commit_frame(self, log_probs: torch.Tensor | None, final: bool) -> int | None:
        """The output frame to commit up to (None: nothing to commit yet)."""
        s = self.settings
        if log_probs is None:  # silence or the stream's end: let it go, keeping the context
            return 0 if len(self.pending) and (final or self._seconds(len(self.pending)) >= s.commit_after_seconds) \
                else None
        if final:
            return len(log_probs)
        pending_seconds = self._seconds(len(self.pending))
        if pending_seconds < s.commit_after_seconds:
            return None
        frame_seconds = self._seconds(self.frame_samples)
        last_allowed = len(log_probs) - int(s.stable_seconds / frame_seconds)
        pause = last_pause_end(log_probs[:max(0, last_allowed)], int(s.pause_seconds / frame_seconds))
        if pause is not None:
            return pause
        if pending_seconds >= s.max_window_seconds:  # no pause in a long stretch: cut at the stable part
            return max(1, last_allowed)
        return None

    def _advance(self, n_samples: int) -> None:
        """Move the commit point ``n_samples`` into the pending audio; keep the context before it."""
        n_samples = min(n_samples, len(self.pending))
        heard = np.concatenate([self.context, self.pending[:n_samples]])
        keep = int(self.settings.context_seconds * SAMPLE_RATE)
        self.context = heard[-keep:] if keep else np.zeros(0, np.float32)
        self.pending = self.pending[n_samples:]


def last_pause_end(log_probs: torch.Tensor, min_frames: int, blank: int = 0) -> int | None:
    """The frame in the middle of the last run of at least ``min_frames`` frames whose most likely token is the
    blank (a pause between words), or None when there is no such run. log_probs: (T', V)."""
    if len(log_probs) == 0:
        return None
    is_blank = (log_probs.argmax(dim=-1) == blank).tolist()
    run_end, run = None, 0
    for t in range(len(is_blank) - 1, -1, -1):
        if is_blank[t]:
            run += 1
            if run_end is None:
                run_end = t + 1
            if run >= min_frames:
                # extend to the run's start, then cut in its middle: both sides keep some silence
                start = t
                while start > 0 and is_blank[start - 1]:
                    start -= 1
                return (start + run_end) // 2
        else:
            run_end, run = None, 0
    return None
