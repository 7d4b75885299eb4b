"""Data-parallel training and sharded evaluation: the sampler's shards, and real torchrun runs (gloo, CPU, two
processes of the tiny preset for a few steps). The commands are the documented multi-GPU ones with only the
device and the process count changed (see docs/TRAINING.md, "Many GPUs or machines")."""
import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asr_core.checkpoint import read_config, read_state
from asr_core.data import BucketBatchSampler, RankBatchSampler, load_utterances, write_manifest
from asr_core.errors import SettingsError
from asr_core.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 2e-5  # max |difference| of any weight: float sums over ranks vs over micro-batches, 8 AdamW steps


def _durations(n: int = 57, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(1.0, 15.0) for _ in range(n)]


@pytest.mark.parametrize("world, accumulate", [(1, 1), (2, 1), (3, 2), (2, 4)])
def test_ranks_take_disjoint_batches_and_the_epoch_covers_the_data(world, accumulate):
    base = BucketBatchSampler(_durations(), 40.0, seed=3)
    ranks = [RankBatchSampler(BucketBatchSampler(_durations(), 40.0, seed=3), r, world, accumulate)
             for r in range(world)]
    for s in ranks:
        s.set_epoch(2)
    base.set_epoch(2)
    n = len(base)  # batches of this epoch: bucket boundaries move between epochs
    taken = [list(s) for s in ranks]
    assert len({len(t) for t in taken}) == 1  # the same number of steps on every rank, or DDP would hang
    assert len(taken[0]) == ranks[0].steps_per_epoch() * accumulate == len(ranks[0])
    # exactly the epoch's batches (disjoint sets of utterances), each taken by one rank once, plus the last
    # step's filling from the epoch's start: so the ranks saw disjoint audio and every utterance at least once
    padding = ranks[0].steps_per_epoch() * world * accumulate - n
    expected = base.batches() + base.batches()[:padding]
    assert sorted(tuple(b) for t in taken for b in t) == sorted(tuple(b) for b in expected)
    assert sorted(i for b in base.batches() for i in b) == list(range(len(_durations())))
    if padding == 0:
        for step_batches in zip(*taken):
            ids = [i for batch in step_batches for i in batch]
            assert len(ids) == len(set(ids))

def test_a_position_in_global_batches_resumes_on_another_world_size():
    """2 ranks x 1 for 3 steps, then 1 rank x 2 micro-batches: the same global batches, in the same steps."""
    durations = _durations(80)

    def steps(world, accumulate, start, count):
        samplers = [RankBatchSampler(BucketBatchSampler(durations, 30.0, seed=1), r, world, accumulate)
                    for r in range(world)]
        for s in samplers:
            s.set_epoch(0, start)
        streams = [iter(s) for s in samplers]
        out = []
        for _ in range(count):  # one step: every rank's micro-batches
            out.append(sorted(i for _ in range(accumulate) for stream in streams for i in next(stream)))
        return out

    straight = steps(2, 1, 0, 6)
    assert steps(2, 1, 0, 3) + steps(1, 2, 3 * 2, 3) == straight
    assert steps(4, 1, 2, 1)[0] == sorted(straight[1] + straight[2])


# ---- real runs under torchrun ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest(tmp_path_factory, dev_dir):
    utts = sorted(load_utterances(str(dev_dir / "1272")), key=lambda u: u.duration)[:8]
    path = tmp_path_factory.mktemp("ddp_data") / "train.jsonl"
    write_manifest(utts, str(path))
    return str(path)


def _torchrun() -> list[str]:
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _train_args(manifest: str, out, steps: int, *extra: str) -> list[str]:
    return ["train", "--data", manifest, "--dev", manifest, "--dev-limit", "4", "--out", str(out), "--preset", "tiny",
            "--dropout", "0", "--max-steps", str(steps), "--batch-seconds", "12", "--warmup-steps", "2",
            "--lr", "3e-3", "--eval-every", "4", "--save-every", "2", "--threads", "1", "--speed-perturb", "1",
            "--no-spec-augment", *extra]


def _launch(nproc: int, args: list[str], timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", str(nproc), "-m", "asr_core", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **popen)


def _ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _weights(path) -> dict:
    return load_file(str(path)) if str(path).endswith(".safetensors") else read_state(str(path))


def _max_difference(a, b) -> float:
    sa, sb = _weights(a), _weights(b)
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def _in_process(args: list[str]) -> None:
    import edge_asr

    threads = torch.get_num_threads()
    try:
        assert edge_asr.main(args) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_effective_batch(manifest, tmp_path):
    two = tmp_path / "two"
    run = _ok(_launch(2, _train_args(manifest, two, 8)))
    assert "2 process(es) x 1 micro-batch(es) x 12 s = 24 s" in run.stderr
    # rank 0 alone wrote: one log row per logged step, one set of folders, one summary on stdout
    rows = list(csv.DictReader(open(two / "log.csv")))
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert run.stdout.count('"reason"') == 1
    assert sorted(os.listdir(two)) == ["averaged", "best", "last", "log.csv", "snapshots", "train_state.pt"]
    training = read_config(str(two / "last"))["provenance"]["details"]["training"]
    assert (training["world_size"], training["effective_batch_seconds"]) == (2, 24.0)

    # one process, two micro-batches of the same size: the same global batches, so the same weights
    _in_process(_train_args(manifest, tmp_path / "one", 8, "--accumulate", "2"))
    assert _max_difference(two / "last", tmp_path / "one" / "last") <= TOLERANCE
    # and not because the batches hardly matter: half the effective batch ends far from both
    _in_process(_train_args(manifest, tmp_path / "half", 8))
    assert _max_difference(two / "last", tmp_path / "half" / "last") > 100 * TOLERANCE


@pytest.mark.slow
def test_loss_falls_on_two_processes_with_frozen_layers_and_an_encoder_warmup(manifest, tmp_path):
    """60 steps: the loss falls; the frozen stem and block 0 never move; the head-only warm-up hands over to the
    whole model (DDP rebuilt for the new set of parameters) without a hang."""
    from asr_core.initialization import ModelInit, initial_model

    out = tmp_path / "run"
    _ok(_launch(2, _train_args(manifest, out, 60, "--eval-every", "30", "--save-every", "30", "--lr", "5e-3",
                               "--freeze-layers", "1", "--freeze-encoder-steps", "5")))
    losses = [float(r["loss"]) for r in csv.DictReader(open(out / "log.csv"))]
    assert losses[-1] < 0.8 * losses[0], losses
    start = initial_model(ModelInit("tiny", dropout=0.0, freeze_layers=1, seed=0))[0].state_dict()
    end = read_state(str(out / "last"))
    frozen = [k for k in start if k.startswith(("subsampling.", "blocks.0."))]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
    assert not torch.equal(start["blocks.1.ffn2.linear1.weight"], end["blocks.1.ffn2.linear1.weight"])


@pytest.mark.slow
def test_a_killed_run_stops_every_rank_and_resumes_where_it_saved(manifest, tmp_path):
    out = tmp_path / "run"
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "asr_core",
           *_train_args(manifest, out, 100000, "--eval-every", "100000", "--save-every", "5")]
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "train_state.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "train_state.pt").exists(), "no save within 2 minutes"
        rank1 = _child_with_env(agent.pid, "RANK", "1")
        os.kill(rank1, signal.SIGKILL)
        _, err = agent.communicate(timeout=90)  # no hang: the other rank stops too
    finally:
        agent.kill()
    assert agent.returncode != 0
    assert "lost contact with the other 1 training process" in err, err[-3000:]
    saved = torch.load(out / "train_state.pt", weights_only=True)["progress"]["step"]
    assert saved % 5 == 0 and saved >= 5
    run = _ok(_launch(2, _train_args(manifest, out, saved + 3, "--eval-every", "100000", "--resume")))
    assert f"resumed at step {saved}" in run.stderr
    assert json.loads(run.stdout)["step"] == saved + 3


@pytest.mark.slow
def test_resume_on_another_number_of_processes_continues_the_same_run(manifest, tmp_path):
    """A 2-process run stopped at step 4 and resumed to step 8 on 1 process with 2 micro-batches ends where its
    copy resumed on 2 processes ends: the position maps to the same global batches."""
    _ok(_launch(2, _train_args(manifest, tmp_path / "same", 4)))
    shutil.copytree(tmp_path / "same", tmp_path / "other")
    _ok(_launch(2, _train_args(manifest, tmp_path / "same", 8, "--resume")))
    run = _ok(_launch(1, _train_args(manifest, tmp_path / "other", 8, "--resume", "--accumulate", "2")))
    assert "saved by 2 process(es) x 1 micro-batch(es), now 1 x 2" in run.stderr
    assert _max_difference(tmp_path / "same" / "last", tmp_path / "other" / "last") <= TOLERANCE
    moved = _max_difference(tmp_path / "same" / "last", tmp_path / "same" / "snapshots" / "step0000004.safetensors")
    assert moved > 100 * TOLERANCE  # the last four steps did change the weights


def test_resuming_with_other_data_is_refused(dev_dir, tmp_path):
    utts = sorted(load_utterances(str(dev_dir / "1272")), key=lambda u: u.duration)[:4]
    cfg = TrainConfig(max_steps=2, batch_seconds=12, warmup_steps=1, speed_factors=(1.0,), spec_augment=False,
                      dev_limit=None, save_every=1)
    from asr_core.config import preset
    from asr_core.model import ConformerCTC
    from asr_core.text import CharTokenizer

    train(ConformerCTC(preset("tiny")), CharTokenizer(), utts, [], cfg, str(tmp_path), progress=False)
    cfg.max_steps = 4
    with pytest.raises(SettingsError, match="position in the data does not carry over"):
        train(ConformerCTC(preset("tiny")), CharTokenizer(), utts[:3], [], cfg, str(tmp_path), resume=True,
              progress=False)


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(tiny_model_dir, dev_dir, tmp_path):
    args = ["evaluate", "--model", tiny_model_dir, "--data", str(dev_dir / "1272"), "--limit", "5", "--threads", "1"]
    _ok(_launch(2, [*args, "--out", str(tmp_path / "two.json")]))
    _in_process([*args, "--out", str(tmp_path / "one.json")])
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert (two["world_size"], two["shard_sizes"]) == (2, [3, 2])
    assert two["utterances"] == one["utterances"]
    assert (two["wer"], two["cer"], two["n_utterances"]) == (one["wer"], one["cer"], one["n_utterances"])


@pytest.mark.slow
def test_nodes_started_with_different_batch_seconds_stop_with_a_message(manifest, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for rank, seconds in ((0, "12"), (1, "20")):
        cmd = [*_torchrun(), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mismatch", "-m", "asr_core",
               *_train_args(manifest, tmp_path / "run", 4), "--batch-seconds", seconds]
        nodes.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [node.communicate(timeout=180)[1] for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    assert all("batch_seconds: rank 0 12.0, rank 1 20.0" in err for err in errs), errs[0][-2000:]
    assert not (tmp_path / "run" / "train_state.pt").exists()


def _child_with_env(parent: int, key: str, value: str) -> int:
    """The pid of the child of ``parent`` whose environment has key=value (torchrun's workers carry RANK)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"{key}={value}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no child of {parent} with {key}={value}")
