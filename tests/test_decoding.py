import torch

from asr_core.decoding import GreedyDecoder, greedy_ids
from asr_core.text import CharTokenizer


def one_hot_log_probs(ids, vocab=29):
    lp = torch.full((len(ids), vocab), -20.0)
    lp[torch.arange(len(ids)), torch.tensor(ids)] = 0.0
    return lp


def test_greedy_collapses_repeats_and_drops_blanks():
    tok = CharTokenizer()
    h, e, l, o, sp = (tok.tokens.index(c) for c in "helo ")
    frames = [0, h, h, 0, e, l, l, 0, l, o, o, 0, sp, 0, h, 0, 0]
    assert greedy_ids(one_hot_log_probs(frames)) == [h, e, l, l, o, sp, h]
    assert GreedyDecoder(tok)(one_hot_log_probs(frames)) == "hello h"
    assert GreedyDecoder(tok)(one_hot_log_probs([0, 0, 0])) == ""
    assert greedy_ids(torch.zeros(0, 29)) == []


def test_batch_respects_lengths():
    tok = CharTokenizer()
    a = tok.tokens.index("a")
    lp = torch.stack([one_hot_log_probs([a, 0, a, a]), one_hot_log_probs([a, a, a, a])])
    assert GreedyDecoder(tok).batch(lp, torch.tensor([4, 1])) == ["aa", "a"]
