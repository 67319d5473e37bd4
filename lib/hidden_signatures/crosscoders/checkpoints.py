"""The crosscoder trainer's checkpoints: weights, optimizer state and log, switched in whole, and exact resume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .. import io
from . import convergence
from . import crosscoder as cc_mod

CHECKPOINT_DIR = "checkpoint"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def save_checkpoint(model: cc_mod.Crosscoder, opt: torch.optim.Optimizer, step: int, log: list[dict],
                    directory: Path, curve: list[dict] | None = None,
                    control: convergence.Control | None = None) -> None:
    """Weights, optimizer state and log at `step`, switched in only once complete.

    The new checkpoint is written to <directory>.next (state file last), then swapped in by two
    renames; a kill at any point leaves either the previous or the new checkpoint whole
    (resume also looks at <directory>.prev, the state between the two renames).
    """
    staging, previous = _sibling(directory, "next"), _sibling(directory, "prev")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save(staging)
    tensors, meta = io.optimizer_tensors(opt)
    io.save_tensors(staging / OPTIMIZER_FILE, tensors)
    for extra in directory.glob("*.json") if directory.exists() else ():  # e.g. the training key
        if extra.name not in (STATE_FILE, cc_mod.CONFIG_FILE):
            shutil.copy2(extra, staging / extra.name)
    io.write_json(staging / STATE_FILE, {"step": step, "optimizer": meta, "log": log, "curve": curve or [],
                                          "control": control.to_dict() if control else None,
                                          "weights_sha256": io.file_sha256(staging / cc_mod.WEIGHTS_FILE),
                                          "optimizer_sha256": io.file_sha256(staging / OPTIMIZER_FILE)})
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(staging, directory)
    shutil.rmtree(previous, ignore_errors=True)


def _sibling(directory: Path, tag: str) -> Path:
    return directory.with_name(f"{directory.name}.{tag}")


def remove_checkpoints(directory: Path) -> None:
    """Delete a checkpoint and any half-switched siblings (after a finished run)."""
    for path in (directory, _sibling(directory, "next"), _sibling(directory, "prev")):
        shutil.rmtree(path, ignore_errors=True)


def resume(model: cc_mod.Crosscoder, opt: torch.optim.Optimizer, directory: Path,
            l1_coeff: float) -> tuple[int, list, list, convergence.Control]:
    """Load the checkpoint if there is a consistent one; a corrupt one is reported and ignored."""
    if not (directory / STATE_FILE).exists() and (_sibling(directory, "prev") / STATE_FILE).exists():
        directory = _sibling(directory, "prev")  # killed between the two renames of save_checkpoint
    fresh = 0, [], [], convergence.Control(l1=float(l1_coeff))
    if not (directory / STATE_FILE).exists():
        return fresh
    initial = {name: t.clone() for name, t in model.state_tensors().items()}
    try:
        state = io.read_json(directory / STATE_FILE)
        step, log, curve = int(state["step"]), list(state["log"]), list(state["curve"])
        control = convergence.Control.from_dict(state["control"])
        for name, key in ((cc_mod.WEIGHTS_FILE, "weights_sha256"), (OPTIMIZER_FILE, "optimizer_sha256")):
            if io.file_sha256(directory / name) != state[key]:
                raise io.ArtifactError(f"{directory / name}: hash does not match the checkpoint state")
        cc_mod.load_state(model, io.load_tensors(directory / cc_mod.WEIGHTS_FILE), directory)
        io.restore_optimizer(opt, io.load_tensors(directory / OPTIMIZER_FILE), state["optimizer"])
    except (io.ArtifactError, KeyError, FileNotFoundError, ValueError, TypeError) as exc:
        cc_mod.load_state(model, initial, "initial weights")  # undo a half-done load
        print(f"warning: ignoring unusable checkpoint ({exc}); training from the start")
        return fresh
    print(f"resuming from step {step} ({directory})")
    return step, log, curve, control
