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
import sys

import torch.distributed as dist

from ..models import loading as models
from ..process_group import active, init_from_env, rank_zero_first
from . import pipeline


def main(argv: list[str] | None = None) -> int:
    """Harvest (sharded) and train (DDP) the points of one params file under torchrun."""
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
