"""``edge-asr listen``: live transcription from the default microphone, for laptop demos.

Audio arrives in blocks from a sounddevice input stream (PortAudio). Every ``--step`` seconds the text of the
current utterance window (the last ``--window`` seconds) is decoded again and printed when it changed; when
the window is full it is committed and a new line starts, so memory stays bounded however long it runs.
"""
from __future__ import annotations

import argparse
import queue
import sys

import numpy as np

from .audio import SAMPLE_RATE, SILENCE_PEAK


class LiveTranscriber:
    """Feed blocks of 16 kHz float samples with :meth:`callback` (the sounddevice signature); call
    :meth:`poll` to get text updates. Separated from the device so it can be tested with recorded audio."""

    def __init__(self, transcriber, *, window_seconds: float = 10.0, step_seconds: float = 1.0):
        self.transcriber = transcriber
        self.window = int(window_seconds * SAMPLE_RATE)
        self.step = int(step_seconds * SAMPLE_RATE)
        self.blocks: "queue.Queue[np.ndarray]" = queue.Queue()
        self.buffer = np.zeros(0, np.float32)
        self.since_decode = 0
        self.last_text = ""
        self.committed: list[str] = []

    def callback(self, indata, frames, time_info, status) -> None:  # called on PortAudio's thread
        self.blocks.put(np.asarray(indata, dtype=np.float32).reshape(frames, -1).mean(axis=1).copy())

    def poll(self) -> list[tuple[str, str]]:
        """Drain arrived audio; returns updates as ("partial" | "final", text)."""
        updates = []
        while True:
            try:
                block = self.blocks.get_nowait()
            except queue.Empty:
                break
            self.buffer = np.concatenate([self.buffer, block])
            self.since_decode += len(block)
            if self.since_decode >= self.step:
                self.since_decode = 0
                text = self._decode()
                if text != self.last_text:
                    self.last_text = text
                    updates.append(("partial", text))
            if len(self.buffer) >= self.window:
                text = self._decode()
                self.committed.append(text)
                updates.append(("final", text))
                self.buffer, self.last_text, self.since_decode = np.zeros(0, np.float32), "", 0
        return updates

    def _decode(self) -> str:
        if len(self.buffer) < SAMPLE_RATE // 5 or np.abs(self.buffer).max() < SILENCE_PEAK:
            return ""
        return self.transcriber.transcribe(self.buffer)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 600 seconds, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-asr listen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped baseline)")
    parser.add_argument("--device", default=None, help="input device name or index (default: the system's)")
    parser.add_argument("--window", type=_seconds, default=10.0, help="seconds per committed line (default 10)")
    parser.add_argument("--step", type=_seconds, default=1.0, help="seconds between updates (default 1)")
    args = parser.parse_args(argv)
    if args.step > args.window:
        parser.error(f"--step ({args.step:g} s) must not exceed --window ({args.window:g} s)")
    try:
        import sounddevice as sd
    except (ImportError, OSError) as err:
        print(f"edge-asr listen: no audio input available: {err}. Install PortAudio (Debian: libportaudio2) and "
              "`pip install sounddevice`.", file=sys.stderr)
        return 1
    from .errors import EdgeASRError
    from .transcribe import Transcriber

    try:
        transcriber = Transcriber.from_folder(args.model)
    except EdgeASRError as err:
        print(f"edge-asr listen: error: {err}", file=sys.stderr)
        return 2
    live = LiveTranscriber(transcriber, window_seconds=args.window, step_seconds=args.step)
    try:
        stream = sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", device=args.device,
                                blocksize=SAMPLE_RATE // 10, callback=live.callback)
    except Exception as err:  # noqa: BLE001 - PortAudio raises its own error types
        print(f"edge-asr listen: cannot open an input device: {err}", file=sys.stderr)
        return 1
    print("listening (Ctrl-C to stop)...", file=sys.stderr)
    try:
        with stream:
            while True:
                sd.sleep(100)
                for kind, text in live.poll():
                    print(("\r" + text + " " * 10) if kind == "partial" else ("\r" + text + "\n"), end="",
                          flush=True)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0
