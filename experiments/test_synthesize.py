"""experiments/synthesize_speech.py: which sentences a voice may read, and the manifest it writes (a fake voice)."""
import importlib.util
import json

import numpy as np
import soundfile as sf
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from asr_core.data import load_utterances

spec = importlib.util.spec_from_file_location("synthesize_speech", REPO / "experiments" / "synthesize_speech.py")
synthesize_speech = importlib.util.module_from_spec(spec)
spec.loader.exec_module(synthesize_speech)


def test_only_sentences_read_as_written_are_kept(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join([
        "She was the youngest of the two daughters of a most affectionate, indulgent father;",
        "It was in the year 1816 that the house was built at last;",   # digits: a voice says them its own way
        "Mr. Knightley was a sensible man of about seven or eight and thirty.",  # abbreviation
        "The letter was signed by J. Smith of the old firm in town.",   # an initial
        "CHAPTER IV and then the story went on as it had begun.",       # capitals: a Roman numeral
        "It was a well-known fact among all of the village people.",    # hyphen
        "Too short to read.",
        "She was the youngest of the two daughters of a most affectionate, indulgent father;",  # a repeat
        '"Oh, no!" said she, "I would not have it so for the world."',
    ]))
    kept = synthesize_speech.readable_sentences(str(text))
    assert kept == ["She was the youngest of the two daughters of a most affectionate, indulgent father;",
                    '"Oh, no!" said she, "I would not have it so for the world."']


def test_manifest_rows_are_the_normalised_text_of_what_was_read(tmp_path, monkeypatch):
    def fake_voice(sentence, wav, rng):  # a 22.05 kHz tone as long as the sentence has words
        seconds = 0.3 * len(sentence.split())
        sf.write(wav, 0.5 * np.sin(np.arange(int(22050 * seconds)) / 5.0), 22050)
        return "fake:tone:1.00"

    monkeypatch.setitem(synthesize_speech.READERS, "espeak", fake_voice)
    monkeypatch.setattr(synthesize_speech.shutil, "which", lambda tool: "/usr/bin/" + tool)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"Sentence number {w} was read aloud by the fake voice today." for w in
                              ("one", "two", "three", "four", "five", "six")))
    train = tmp_path / "train.jsonl"
    sf.write(tmp_path / "real.wav", np.zeros(16000, dtype=np.float32), 16000)
    train.write_text(json.dumps({"audio_filepath": "real.wav", "text": "a real one", "duration": 1.0}) + "\n")
    out = tmp_path / "synth"
    synthesize_speech.main(["--text", str(text), "--out", str(out), "--hours", str(8 / 3600), "--voices", "espeak",
                            "--processes", "1", "--with", str(train)])
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # 3.3 s per sentence (11 words): the budget of 8 s is passed by the third
    for row in rows:
        assert row["text"].startswith("sentence number ") and row["text"].endswith(" fake voice today")
        assert row["voice"] == "fake:tone:1.00" and abs(row["duration"] - 3.3) < 0.01
        samples, rate = sf.read(out / row["audio_filepath"])
        assert rate == 16000 and abs(len(samples) / rate - 3.3) < 0.05
    assert sorted(p.name for p in out.glob("*.opus")) == sorted(r["audio_filepath"] for r in rows)
    combined = load_utterances(str(out / "with_train.jsonl"))
    assert [u.text for u in combined] == ["a real one"] + [r["text"] for r in rows]
