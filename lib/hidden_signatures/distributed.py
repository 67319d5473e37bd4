"""Several processes on one run: a sharded harvest, then DistributedDataParallel training.

    torchrun --nproc_per_node N -m hidden_signatures.distributed params/<pair>.yaml [--layer NAME] [--quick]

runs the harvest and the training of one point (`--layer middle`, a variant such as
`middle-batchtopk`, or every point when --layer is left out) with N processes on one machine:
gloo on CPU, nccl with one GPU per process on CUDA. Afterwards the notebooks and run_all.sh find
the store and the crosscoder cached and go straight to the analysis. The single-process notebooks
stay the main path; this is for runs too big for one process.

- Harvest: rank r runs the forward passes of batches r, r + N, r + 2N, ... and writes its rows
  into the store's shared memory-mapped files (rank 0 creates them first and finishes the store
  last). The store is byte-identical to a single-process one, and a killed harvest resumes with
  any number of processes (progress is committed after every rank flushed).
- Training: every rank computes the same global batch of `train.batch_size` rows and takes every
  N-th row; gradients are averaged by DDP, so the global batch and the result are those of one
  process, up to float rounding (relu_l1, dfc). batchtopk keeps the top k x n activations of
  each rank's n rows (a per-rank BatchTopK), and its threshold statistics are rank 0's.
  Rank 0 alone writes checkpoints, the log and the crosscoder; a killed run resumes from the
  checkpoint with any number of processes.

Limits: all ranks of a sharded harvest must be on one machine (they write one set of memory-mapped
files); on several machines, harvest with one first, then train with all (the cache must be on a
shared filesystem). Derived models (distillation students) must be built first (notebook 00_models).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import sys
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


# -- the command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Harvest (sharded) and train (DDP) the points of one params file under torchrun."""
    from . import models, pipeline

    parser = argparse.ArgumentParser(prog="python -m hidden_signatures.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", help="params file, e.g. params/smollm2-same.yaml")
    parser.add_argument("--layer", help="point to train (a layer label or variant name); default: all")
    parser.add_argument("--quick", action="store_true", help="use the params file's quick budget")
    args = parser.parse_args(argv)
    run = pipeline.load_run(args.params, quick=args.quick)
    names = [pipeline.point(run, args.layer).name] if args.layer else [p.name for p in pipeline.points(run)]
    init_from_env(models.pick_device(run.device))
    with rank_zero_first():  # packaged-model conversion and corpus caches happen once
        layers = pipeline.validate(run)
        tokens = pipeline.pair_tokens(run)
    stores = pipeline.harvest(run, tokens, layers)
    for name in names:
        pipeline.train_layer(run, name, pipeline.paired(run, stores, layers[pipeline.point(run, name).label]))
    if active():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
