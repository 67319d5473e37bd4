"""Harvest residual-stream activations with nnsight into a resumable on-disk store.

One forward pass per batch saves the input of every requested block ("resid_pre") and stops
after the deepest one. Rows are kept at chosen positions only (never position 0, the BOS /
attention-sink token; for pairs with different tokenizers, only aligned positions) and
written as raw bf16 bits to one memory-mapped file per layer, so a store of any size is
streamed from disk. A store is trusted only when its manifest exists and every file has the
size the manifest records; an interrupted harvest resumes from its last flushed batch.

Under torchrun (run/distributed.py) rank r runs batches r, r + N, ... into the same files, which
rank 0 creates and finishes. With `remote=True` the forward passes run on NDIF (nnsight's
remote execution) and the model is only built on the meta device here; see `harvest`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import io, precision, process_group
from ..models import loading as models
from .store import (EVAL_SPLIT, INDEX, MANIFEST, PROGRESS, STORE_VERSION,  # noqa: F401  (activations.X, as before)
                    ActivationStore, PairedActivations, eval_sequences, layer_file, store_key, to_float,
                    verify_store)

def all_but_first(n_seqs: int, seq_len: int) -> list[torch.Tensor]:
    """Positions 1..seq_len-1 of every sequence (the same-tokenizer case)."""
    pos = torch.arange(1, seq_len)
    return [pos] * n_seqs


def model_identity(spec: str) -> str:
    """What identifies a model's weights for cache keys: the spec plus, for dirs, weight sizes/mtimes."""
    path = Path(models.resolve_spec(spec))
    if not path.is_dir():
        return spec
    stats = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.glob("*.safetensors"))
    return io.config_hash({"spec": spec, "files": stats})


def harvest(spec: str, ids_SL: torch.Tensor, layers: list[int], positions: list[torch.Tensor] | None = None,
            batch_size: int = 8, dtype: str = "auto", device: str | torch.device = "cpu",
            root: Path | None = None, desc: str | None = None, remote: bool | str = False) -> ActivationStore:
    """Harvest (or reuse) the store of `spec` on these sequences, layers and positions.

    `dtype` is the forward pass's: auto (bf16 where the device computes it natively, else fp32),
    bfloat16 or float32; rows are stored as bf16 either way.

    remote=True runs every forward pass on NDIF (nnsight remote execution: needs NDIF_API_KEY set
    and a hub id that NDIF hosts; nnsight unpickles the server's replies). The model is only built
    on the meta device here (config and tokenizer), `dtype` and `device` are the server's business,
    and the store gets its own cache key. remote="local" runs nnsight's offline simulation of that
    path (the trace serialised as for NDIF, run on the local model), for tests.
    """
    if remote is True and (spec in models.PACKAGED or Path(spec).expanduser().exists()):
        raise ValueError(f"harvest.remote: model {spec!r} is a packaged name or a local directory; "
                         "accepted: a hub id that NDIF hosts (or set harvest.remote: false)")
    positions = positions if positions is not None else all_but_first(*ids_SL.shape)
    layers = sorted(set(int(x) for x in layers))
    dtype = dtype if remote is True else precision.resolve(dtype, process_group.local_device(device))
    identity = model_identity(spec) + ("@ndif" if remote is True else "")
    key = store_key(identity, ids_SL, positions, layers, dtype)
    directory = (root or io.cache_root() / "activations") / key
    if verify_store(directory) is not None:
        return ActivationStore.open(directory)
    rank, world = process_group.init_from_env(device)
    # Pairs harvested side by side (schedule.py) may want the same store: one fills it, the other
    # waits and reuses it. The ranks of one torchrun group fill it together, so they take no lock.
    with io.file_lock(directory) if world == 1 else contextlib.nullcontext():
        if verify_store(directory) is None:
            traced = _remote_model(spec) if remote is True else _local_model(spec, device, dtype, remote)
            _fill_store(traced, ids_SL, layers, positions, directory, batch_size, desc or spec)
            if rank == 0:
                _finish_store(directory, spec, layers, traced.d_model, positions)
        process_group.barrier()
    return ActivationStore.open(directory)


@dataclass
class Traced:
    """A model wrapped by nnsight, its block list envoy, and how its traces run."""

    nn_model: Any
    blocks: Any
    d_model: int
    device: torch.device
    """Where the input ids go (cpu for a remote model, whose weights never load here)."""
    remote: bool | str = False
    """Passed to nnsight's trace: False runs here, True on NDIF, "local" simulates NDIF."""


def _local_model(spec: str, device: str | torch.device, dtype: str, remote: bool | str) -> Traced:
    """Load the model here (this process's device under torchrun) and wrap it for tracing."""
    from nnsight.modeling.transformers import TransformersModel

    model, tokenizer = models.load_model(spec, device=process_group.local_device(device), dtype=getattr(torch, dtype))
    return _envoy_blocks(TransformersModel(model, tokenizer=tokenizer), models.block_path(model), remote)


def _remote_model(spec: str) -> Traced:
    """Build a hub model on the meta device (config and tokenizer only, no weights) for NDIF traces."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    nn_model = TransformersModel(spec, task="text-generation", tokenizer=tokenizer, trust_remote_code=False)
    return _envoy_blocks(nn_model, models.block_path(nn_model._module), remote=True)


def _envoy_blocks(nn_model, path: str, remote: bool | str = False) -> Traced:
    """An nnsight model ready for _forward: the envoy of its block list at `path` (e.g. 'model.layers')."""
    envoy = nn_model
    for part in path.split("."):
        envoy = getattr(envoy, part)
    module = nn_model._module
    device = torch.device("cpu") if remote is True else next(module.parameters()).device
    return Traced(nn_model, envoy, models.hidden_size(module), device, remote)


def _fill_store(traced: Traced, ids_SL: torch.Tensor, layers: list[int], positions: list[torch.Tensor],
                directory: Path, batch_size: int, desc: str) -> None:
    """Run the forward passes, writing rows to partial memmaps; resumable via progress.json.

    Under torchrun, rank r runs batches r, r + N, ... of each round of N batches; progress is
    committed (by rank 0, after every rank flushed) at round ends, so it means the same thing
    for any number of processes.
    """
    rank, world = process_group.rank_world()
    if world > 1 and not process_group.all_ranks_local():
        raise ValueError(f"a sharded harvest needs all {world} processes on one machine "
                         f"(LOCAL_WORLD_SIZE={os.environ.get('LOCAL_WORLD_SIZE')}); harvest on one machine first")
    counts = torch.tensor([len(p) for p in positions])
    seq_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    n_tokens, n_seqs = int(seq_ptr[-1]), ids_SL.shape[0]
    done = _open_partials(directory, layers, n_tokens, traced.d_model) if rank == 0 else 0
    done = process_group.broadcast(done)  # rank 0 has created (or kept) the files the others now open
    maps = {L: np.memmap(_partial(directory, L), dtype=np.uint16, mode="r+", shape=(n_tokens, traced.d_model))
            for L in layers}
    round_size = batch_size * world
    with tqdm(total=n_seqs, initial=done, desc=f"harvest {desc}", unit="seq", disable=rank != 0) as bar:
        for round_start in range(done, n_seqs, round_size):
            round_stop = min(round_start + round_size, n_seqs)
            start = round_start + rank * batch_size
            if start < round_stop:
                stop = min(start + batch_size, n_seqs)
                acts = _forward(traced, ids_SL[start:stop].to(traced.device), layers)
                for L in layers:
                    rows = torch.cat([acts[L][i, positions[start + i]] for i in range(stop - start)])
                    bits = rows.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
                    maps[L][int(seq_ptr[start]):int(seq_ptr[stop])] = bits
            if (round_stop // round_size) % 16 == 0 or round_stop == n_seqs:
                for mm in maps.values():
                    mm.flush()
                process_group.barrier()  # every rank's rows of this round are on disk
                if rank == 0:
                    io.write_json(directory / PROGRESS, {"seqs_done": round_stop, "n_tokens": n_tokens})
            bar.update(round_stop - round_start)
    for mm in maps.values():
        mm.flush()
    del maps
    if rank == 0:
        io.save_tensors(directory / INDEX, {"seq_ptr": seq_ptr, "pos": torch.cat(positions).long()})


def _open_partials(directory: Path, layers: list[int], n_tokens: int, d_model: int) -> int:
    """Sequences already harvested (0: the partial files are created anew, zero-filled)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = _progress(directory, n_tokens)
    if not all(_partial(directory, L).exists() for L in layers):
        done = 0  # e.g. killed inside _finish_store after renaming: the partial files are gone
    if done == 0:
        (directory / PROGRESS).unlink(missing_ok=True)  # a stale one must not vouch for the new files
        for L in layers:
            np.memmap(_partial(directory, L), dtype=np.uint16, mode="w+", shape=(n_tokens, d_model)).flush()
    return done


def _forward(traced: Traced, ids_BL: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """One traced forward pass saving each layer's input; stops after the deepest layer.

    The dict is built and saved inside the trace so that a remote run, which returns only
    saved values, hands it back too.
    """
    import nnsight

    blocks = traced.blocks
    with torch.no_grad(), traced.nn_model.trace(ids_BL, remote=traced.remote) as tracer:
        saved = {}
        for L in layers:
            saved[L] = blocks[L].input
        saved = nnsight.save(saved)
        tracer.stop()
    return {L: (v[0] if isinstance(v, tuple) else v) for L, v in saved.items()}


def _partial(directory: Path, layer: int) -> Path:
    return directory / f"layer_{layer}.bin.partial"


def _progress(directory: Path, n_tokens: int) -> int:
    """Sequences already harvested by an interrupted run (0 when starting fresh)."""
    try:
        progress = io.read_json(directory / PROGRESS)
    except io.ArtifactError:
        return 0
    return int(progress["seqs_done"]) if progress.get("n_tokens") == n_tokens else 0


def _finish_store(directory: Path, spec: str, layers: list[int], d_model: int,
                  positions: list[torch.Tensor]) -> None:
    """Rename partial files into place, compute norm factors, write the manifest last."""
    n_tokens = sum(len(p) for p in positions)
    for L in layers:
        os.replace(_partial(directory, L), layer_file(directory, L))
    factors = {}
    for L in layers:
        rows = np.memmap(layer_file(directory, L), dtype=np.uint16, mode="r", shape=(n_tokens, d_model))
        factors[str(L)] = norm_factor(rows, d_model)
    io.write_json(directory / MANIFEST, {
        "version": STORE_VERSION, "complete": True, "model": spec, "layers": layers,
        "d_model": d_model, "n_tokens": n_tokens, "n_seqs": len(positions),
        "dtype": "bfloat16", "norm_factors": factors})
    (directory / PROGRESS).unlink(missing_ok=True)


def norm_factor(rows_u16: np.ndarray, d_model: int, sample: int = 20_000) -> float:
    """sqrt(d) / mean ||x|| over an evenly spaced sample of rows (PAPER.md's scaling)."""
    n = rows_u16.shape[0]
    idx = np.linspace(0, n - 1, num=min(sample, n)).astype(np.int64)
    x = to_float(rows_u16[idx])
    return float(math.sqrt(d_model) / x.norm(dim=1).mean().item())
