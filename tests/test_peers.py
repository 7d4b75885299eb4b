"""The peers (Whisper tiny.en via faster-whisper, pocketsphinx) measured like our models, on real speech."""
from pathlib import Path

import pytest

from asr_core.data import load_utterances
from asr_core.errors import SettingsError
from asr_core.text import normalize_text


def test_numbers_and_ordinals_are_spelled_out_on_both_sides():
    assert normalize_text("The 3rd of 1,000 men, the 21st and 40th.") == \
        "the third of one thousand men the twenty first and fortieth"


def test_an_unknown_engine_is_refused():
    from asr_core.peers import load_peer

    with pytest.raises(SettingsError, match="unknown engine"):
        load_peer("whisper-huge")


@pytest.mark.parametrize("name, worst_wer", [("whisper-tiny.en", 0.4), ("pocketsphinx", 0.9)])
def test_peer_transcribes_held_out_speech(name, worst_wer, dev_dir):
    from asr_core.peers import available_peers, evaluate_peer, load_peer

    if available_peers()[name]:
        pytest.skip(f"{name}: {available_peers()[name]}")
    utterances = load_utterances(str(dev_dir / "1272"), limit=3)
    result = evaluate_peer(load_peer(name, 1), utterances, warmup=0, progress=False)
    assert result["wer"] < worst_wer, result["utterances"]
    assert result["rtf"] > 0 and result["bytes_on_disk"] > 1e6
    assert all(u["hypothesis"] for u in result["utterances"])


def test_benchmark_rows_for_the_peers(dev_dir, tmp_path):
    from compression.benchmark import peer_rows

    rows = peer_rows(load_utterances(str(dev_dir / "1272"), limit=1), str(tmp_path), progress=False)
    assert {r["variant"] for r in rows} <= {"whisper-tiny.en (peer)", "pocketsphinx (peer)"}
    assert all(r["algorithm"] == "peer" and r["size_mb"] > 1 for r in rows)


@pytest.mark.parametrize("name", ["whisper-tiny.en", "pocketsphinx"])
def test_a_peers_memory_is_measured_like_ours_without_torch(name):
    """The RAM column of a peer row: its library is the runtime (not charged), its model the load; faster-whisper
    and pocketsphinx need no torch, so none is loaded."""
    from asr_core.memory import peak_rss_mb
    from asr_core.peers import available_peers

    if available_peers()[name]:
        pytest.skip(f"{name}: {available_peers()[name]}")
    clip = str(Path(__file__).resolve().parents[1] / "assets" / "clips" / "251-118436-0000.opus")
    figures = peak_rss_mb(name, "peer", clip=clip, threads=1)
    assert figures["peak_mb"] >= figures["load_mb"] > 1 and figures["text"].strip()
    assert figures["torch_imported"] is False
    with pytest.raises(SettingsError, match="unknown peer"):
        peak_rss_mb("whisper-huge", "peer")
