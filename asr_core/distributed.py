"""Data parallelism on PyTorch's own engine: the process group torchrun sets up, and the few collectives
training and evaluation need (agreeing on settings, summing figures, gathering hypotheses).

A process started without torchrun is a world of one: every function here is then a no-op that returns its
input, so the single-process paths run the same code. ``torchrun --nproc_per_node N -m asr_core train ...``
sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; NCCL is used on CUDA and gloo on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import EdgeASRError, SettingsError

DEFAULT_TIMEOUT_S = 600.0  # longest a rank waits at a collective: above the longest rank-0-only save


class DistributedError(EdgeASRError):
    """Another process of a data-parallel run died or stopped answering."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (rank 0 of 1 when started without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, shows progress and writes files."""
        return self.rank == 0


def launched_world() -> World:
    """The world torchrun describes in the environment (one process without it); starts nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_world(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group torchrun started (NCCL on CUDA, gloo on CPU) when there is more than one process.

    ``timeout_s`` bounds every collective: a rank that died makes the others fail with a message instead of
    waiting forever. Returns the world; call :func:`leave_world` when done.
    """
    world = launched_world()
    if not world.active or torch.distributed.is_initialized():
        return world
    if not timeout_s > 0:
        raise SettingsError(f"the collective timeout must be above 0 seconds, got {timeout_s}", setting="dist_timeout")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(world.local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                         timeout=datetime.timedelta(seconds=timeout_s))
    return world


def leave_world(world: World, together: bool = True) -> None:
    """Leave the process group. ``together``: first wait at a barrier until every rank is done (rank 0 may still
    be writing files). Skipped after an error, where another rank may be gone and would make this wait out the
    timeout.

    Why the barrier: gloo's worker threads drop their last reference to a finished collective a moment after
    it completes, and that frees Python tensors, which needs the GIL. A rank that leaves right after its last
    collective can reach interpreter shutdown before then, and the worker thread aborts the process
    ("terminate called without an active exception", exit -6). Waiting at the barrier releases the GIL, so
    the worker finishes first.
    """
    if not (world.active and torch.distributed.is_initialized()):
        return
    try:
        if together:
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def joined_world(device: str, timeout_s: float = DEFAULT_TIMEOUT_S, role: str = "data-parallel",
                 then: str = "") -> Iterator[World]:
    """:func:`init_world` for the ``with`` block, then :func:`leave_world`: together when the block ended
    normally, at once when it raised. A collective that failed because another rank is gone (in the block or
    at the closing barrier) becomes one DistributedError line: "rank R lost contact with the other N ``role``
    process(es) ...", then ``then`` (what to do about it)."""
    world = init_world(device, timeout_s)
    try:
        try:
            yield world
        except BaseException:
            leave_world(world, together=False)
            raise
        leave_world(world)
    except RuntimeError as err:
        if lost_contact(world, err):
            raise DistributedError(f"rank {world.rank} lost contact with the other {world.size - 1} {role} "
                                   f"process(es): one died or stopped answering ({str(err).splitlines()[0]})."
                                   + (f" {then}" if then else "")) from None
        raise


def rank_device(world: World, device: str) -> str:
    """Each rank on its own GPU (``cuda:LOCAL_RANK``); CPU ranks share the CPU."""
    return f"cuda:{world.local_rank}" if device == "cuda" and world.active else device


def lost_contact(world: World, err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank is gone (gloo and NCCL raise plain
    RuntimeErrors naming the transport)."""
    if not world.active or not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return isinstance(err, torch.distributed.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def gather_objects(world: World, obj) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` alone)."""
    if not world.active:
        return [obj]
    out = [None] * world.size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(world: World, obj):
    """Rank 0's ``obj`` on every rank."""
    if not world.active:
        return obj
    box = [obj if world.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def sum_values(world: World, values: list[float], device: str = "cpu") -> list[float]:
    """Element-wise sum over ranks of a few floats (one small all-reduce)."""
    if not world.active:
        return list(values)
    device = rank_device(world, device) if device.startswith("cuda") else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def agree(world: World, settings: dict) -> None:
    """Raise SettingsError unless every rank was started with the same ``settings`` (e.g. ``--batch-seconds`` set
    differently on two nodes, or different training data), naming each setting that differs."""
    every = gather_objects(world, settings)
    differ = {key: [s.get(key) for s in every] for key in settings if any(s.get(key) != settings[key] for s in every)}
    if differ:
        lines = "; ".join(f"{key}: " + ", ".join(f"rank {r} {v!r}" for r, v in enumerate(values))
                          for key, values in differ.items())
        raise SettingsError(f"the {world.size} processes were started with different settings ({lines}); start "
                            f"every node with the same command", setting=next(iter(differ)))


def shard_bounds(n: int, world: World) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of ``n`` items: sizes differ by at most one, rank order
    kept, so gathered shards concatenate back to the original order."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (1 if world.rank < extra else 0)
