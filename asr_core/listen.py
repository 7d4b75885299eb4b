"""``edge-asr listen``: live transcription from the default microphone, for laptop demos.

Audio arrives in blocks from a sounddevice input stream (PortAudio) and goes to the same streaming engine as the
app's Live tab (:mod:`asr_core.streaming`): partial text is reprinted as it changes, and a line is committed at a
pause in speech, so memory stays bounded however long it runs.
"""
from __future__ import annotations

import argparse
import queue
import sys

import numpy as np

from .audio import SAMPLE_RATE
from .streaming import PARTIALS, StreamingRecognizer, StreamSettings


class LiveTranscriber:
    """Feed blocks of 16 kHz float samples with :meth:`callback` (the sounddevice signature); call
    :meth:`poll` to get text updates. Separated from the device so it can be tested with recorded audio."""

    def __init__(self, transcriber, settings: StreamSettings | None = None):
        self.engine = StreamingRecognizer(transcriber, settings or StreamSettings())
        self.blocks: "queue.Queue[np.ndarray]" = queue.Queue()

    def callback(self, indata, frames, time_info, status) -> None:  # called on PortAudio's thread
        self.blocks.put(np.asarray(indata, dtype=np.float32).reshape(frames, -1).mean(axis=1).copy())

    def poll(self, final: bool = False) -> list[tuple[str, str]]:
        """Drain arrived audio; returns updates as ("partial" | "final", text). ``final``: the stream ended."""
        updates = []
        while True:
            try:
                block = self.blocks.get_nowait()
            except queue.Empty:
                break
            update = self.engine.feed(block)
            if update is not None:
                updates += _changes(update)
        if final:
            updates += _changes(self.engine.finish())
        return updates


def _changes(update) -> list[tuple[str, str]]:
    return ([("final", update.new_line)] if update.new_line else []) + ([("partial", update.partial)]
                                                                        if update.partial else [])


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 600 seconds, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-asr listen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped baseline)")
    parser.add_argument("--device", default=None, help="input device name or index (default: the system's)")
    parser.add_argument("--window", type=_seconds, default=12.0,
                        help="longest stretch of speech without a pause before a line is committed anyway "
                             "(default 12 s)")
    parser.add_argument("--step", type=_seconds, default=0.5, help="seconds between updates (default 0.5)")
    parser.add_argument("--partials", choices=PARTIALS, default="greedy",
                        help="decoder of the partial text shown before a line is committed: greedy (fast, the "
                             "default) or the same as the committed lines' (the word LM's beam search)")
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
        settings = StreamSettings(step_seconds=args.step, max_window_seconds=args.window, partials=args.partials)
        transcriber = Transcriber.from_folder(args.model)
    except EdgeASRError as err:
        print(f"edge-asr listen: error: {err}", file=sys.stderr)
        return 2
    live = LiveTranscriber(transcriber, settings)
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
    except KeyboardInterrupt:  # the end of the stream: commit what is still pending
        for kind, text in live.poll(final=True):
            if kind == "final":
                print("\r" + text + " " * 10, flush=True)
        print(file=sys.stderr)
    return 0
