"""Process-group primitives shared by the sharded harvest and DDP training: ranks, barriers, broadcasts.

The torchrun command line that uses them is `hidden_signatures.run.distributed`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(hours=2)
"""How long a rank waits at a collective (rank 0 finishing a store, a slow model load) before failing."""


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def init_from_env(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1) if not joined yet; (rank, world).

    Backend nccl when `device` is CUDA (each process then uses cuda:LOCAL_RANK), gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return rank_world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return rank_world()


def local_device(device: str | torch.device) -> torch.device:
    """The device of this process: cuda:LOCAL_RANK for CUDA runs in a process group, else `device`."""
    device = torch.device(device)
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast(value):
    """Rank 0's `value` on every rank (a picklable object; identity in a single process)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_local() -> bool:
    """Whether every rank runs on this machine (torchrun's LOCAL_WORLD_SIZE equals WORLD_SIZE)."""
    _, world = rank_world()
    return int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (conversions, tokenisation caches), then the others reuse its files."""
    rank, _ = rank_world()
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()
