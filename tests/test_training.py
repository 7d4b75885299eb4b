"""The slower end-to-end test: a tiny model trained for a few dozen steps on a handful of real utterances."""
import csv
import os
import signal

import pytest
import torch

from asr_core.checkpoint import load_model, read_config
from asr_core.provenance import training_details
from asr_core.config import preset
from asr_core.data import load_utterances
from asr_core.model import ConformerCTC
from asr_core.text import CharTokenizer
from asr_core.training import TrainConfig, lr_at, train


@pytest.mark.slow
def test_loss_falls_and_training_resumes(dev_dir, tmp_path):
    torch.set_num_threads(2)
    # three short utterances in one batch: a tiny model memorises them, far below the CTC plateau (~2.8)
    utts = sorted(load_utterances(str(dev_dir / "1272")), key=lambda u: u.duration)[:3]
    cfg = TrainConfig(lr=3e-3, warmup_steps=10, max_steps=120, batch_seconds=100, eval_every=60, dev_limit=2,
                      speed_factors=(1.0,), spec_augment=False, save_every=30, log_every=1, average_last=2)
    torch.manual_seed(0)
    model = ConformerCTC(preset("tiny", dropout=0.0))
    out = tmp_path / "run"
    train(model, CharTokenizer(), utts, utts[:2], cfg, str(out), progress=False)
    rows = list(csv.DictReader(open(out / "log.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 120
    assert sum(losses[-5:]) / 5 < min(1.0, 0.25 * sum(losses[:5]) / 5), losses
    for folder in ("last", "best", "averaged"):
        load_model(str(out / folder))

    # resume: ask for 10 more steps; it continues from step 120, not from scratch
    cfg.max_steps = 130
    summary = train(ConformerCTC(preset("tiny", dropout=0.0)), CharTokenizer(), utts, utts[:2], cfg, str(out),
                    resume=True, progress=False)
    assert summary["step"] == 130
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows if r["loss"]][-10:] == list(range(121, 131))
    assert float(rows[-1]["loss"]) < 1.0


def test_schedule():
    cfg = TrainConfig(warmup_steps=10, final_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    assert lr_at(1000, None, cfg) < lr_at(100, None, cfg) < 1.0
    # a run bounded only by time anneals over the time budget: peak at its start, floor at its end
    assert lr_at(10, None, cfg, time_fraction=0.0) == pytest.approx(1.0)
    assert lr_at(10, None, cfg, time_fraction=0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10, None, cfg, time_fraction=1.2) == pytest.approx(0.1)
    assert lr_at(50, 100, cfg, time_fraction=0.99) == lr_at(50, 100, cfg)  # a step count wins over time


def test_frozen_layers_stay_as_they_started(dev_dir, tmp_path):
    """--freeze-layers K: the stem and the first K blocks never change (no gradient step, no weight decay);
    the blocks above and the head do. Out-of-range K is refused before any work."""
    from asr_core.errors import SettingsError

    torch.manual_seed(0)
    utts = sorted(load_utterances(str(dev_dir / "1272")), key=lambda u: u.duration)[:2]
    model = ConformerCTC(preset("tiny", dropout=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(lr=3e-3, warmup_steps=1, max_steps=3, batch_seconds=100, eval_every=100, speed_factors=(1.0,),
                      freeze_layers=1, save_every=100)
    train(model, CharTokenizer(), utts, [], cfg, str(tmp_path / "run"), progress=False)
    assert training_details(read_config(str(tmp_path / "run" / "last")))["freeze_layers"] == 1  # for compress
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("subsampling.", "blocks.0.")) for k in changed), sorted(changed)
    assert any(k.startswith("blocks.1.") for k in changed) and "head.weight" in changed
    with pytest.raises(SettingsError, match="freeze_layers"):
        train(model, CharTokenizer(), utts, [], TrainConfig(max_steps=1, freeze_layers=9), None, progress=False)


def test_slow_layers_learn_at_a_fraction_of_the_rate(dev_dir, tmp_path):
    """--slow-layers K --slow-lr-scale S: the stem and the first K blocks get their own parameter group at lr * S.
    Adam's steps are about lr in size whatever the gradient, so with S = 0.01 block 0 moves about a hundredth as
    far as block 1; with S = 1 the two move comparably. A scale of 0 is refused (that is --freeze-layers)."""
    from asr_core.errors import SettingsError

    utts = sorted(load_utterances(str(dev_dir / "1272")), key=lambda u: u.duration)[:2]

    def movement(scale: float) -> tuple[float, float]:
        torch.manual_seed(0)
        model = ConformerCTC(preset("tiny", dropout=0.0))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=3, batch_seconds=100, eval_every=100,
                          speed_factors=(1.0,), weight_decay=0.0, slow_layers=1, slow_lr_scale=scale)
        train(model, CharTokenizer(), utts, [], cfg, str(tmp_path / f"run{scale}"), progress=False)
        after = model.state_dict()

        def moved(prefix: str) -> float:
            keys = [k for k in before if k.startswith(prefix) and k.endswith("weight")]
            return max(float((after[k] - before[k]).abs().max()) for k in keys)
        return moved("blocks.0."), moved("blocks.1.")

    slow, fast = movement(0.01)
    assert 0 < slow < 0.05 * fast, (slow, fast)
    same_slow, same_fast = movement(1.0)
    assert same_slow > 0.3 * same_fast, (same_slow, same_fast)
    assert training_details(read_config(str(tmp_path / "run0.01" / "last")))["slow_lr_scale"] == 0.01
    with pytest.raises(SettingsError, match="slow_lr_scale"):
        train(ConformerCTC(preset("tiny")), CharTokenizer(), utts, [], TrainConfig(max_steps=1, slow_layers=1,
                                                                                 slow_lr_scale=0), None,
              progress=False)
    with pytest.raises(SettingsError, match="slow_layers"):
        train(ConformerCTC(preset("tiny")), CharTokenizer(), utts, [], TrainConfig(max_steps=1, slow_layers=9), None,
              progress=False)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT handled as in a terminal, even when pytest runs as a background job (which starts with it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _interrupt_at(step: int, times: int):
    """An ``on_step`` that sends this process ``times`` SIGINTs (Ctrl-C) after ``step``."""
    def on_step(state):
        if state["step"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
    return on_step


def test_ctrl_c_stops_after_the_step_saves_and_resumes(dev_dir, tmp_path, capfd, ctrl_c_raises):
    utts = sorted(load_utterances(str(dev_dir / "1272")), key=lambda u: u.duration)[:2]
    cfg = TrainConfig(max_steps=50, batch_seconds=12, warmup_steps=1, speed_factors=(1.0,), spec_augment=False,
                      save_every=100, eval_every=100)
    summary = train(ConformerCTC(preset("tiny")), CharTokenizer(), utts, utts[:1], cfg, str(tmp_path), progress=False,
                    on_step=_interrupt_at(2, 1))
    assert (summary["reason"], summary["step"]) == ("interrupted", 3)  # the signal came after step 2: step 3 ends
    assert "SIGINT: stopping after this step" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler from before is back
    cfg.max_steps = 4
    summary = train(ConformerCTC(preset("tiny")), CharTokenizer(), utts, [], cfg, str(tmp_path), resume=True,
                    progress=False)
    assert (summary["reason"], summary["step"]) == ("max steps", 4)


def test_a_second_ctrl_c_stops_at_once(dev_dir, tmp_path, ctrl_c_raises):
    utts = sorted(load_utterances(str(dev_dir / "1272")), key=lambda u: u.duration)[:2]
    cfg = TrainConfig(max_steps=50, batch_seconds=12, warmup_steps=1, speed_factors=(1.0,), spec_augment=False)
    with pytest.raises(KeyboardInterrupt):
        train(ConformerCTC(preset("tiny")), CharTokenizer(), utts, [], cfg, None, progress=False,
              on_step=_interrupt_at(2, 2))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_the_process_ignores_stays_ignored():
    """A background job started by a shell ignores SIGINT; training must not start stopping on it."""
    from asr_core.training import StopSignals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals(announce=False) as signals:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == signals._request  # SIGTERM is still caught
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)
