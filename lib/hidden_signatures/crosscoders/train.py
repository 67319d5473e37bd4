"""Crosscoder training: Adam, L1 warm-up, lr decay, bf16 where native, checkpoints and exact resume.

The plain ReLU+L1 crosscoder's step runs through fused_loss (hand-written backward, sparse once
few latents fire); variants run through autograd under bf16 autocast where that is native.

The batch order is a pure function of (seed, step), and the checkpoint holds the weights, the
optimizer state and the log, so a run killed at any point and restarted ends with the same
weights, bit for bit on CPU, as an uninterrupted one.

Under torchrun (see run/distributed.py) the crosscoder is wrapped in DistributedDataParallel: every
rank computes the same global batch and trains on every world-th row of it, so the global batch,
and up to float rounding the result, are those of one process. DDP averages gradients only of
work done in its own forward, so it wraps LossModule, whose forward is the step's loss.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import allocator, io, precision, process_group
from ..harvest.store import PairedActivations
from . import convergence, fused_loss, resample, sparse_probe
from . import crosscoder as cc_mod
from .checkpoints import (CHECKPOINT_DIR, OPTIMIZER_FILE, STATE_FILE,  # noqa: F401  (train.X, as before)
                          remove_checkpoints, resume, save_checkpoint)
from .evaluate import evaluate, total_variance
from .train_config import TrainConfig

LOG_FILE = "train_log.json"
CURVE_FILE = "convergence.json"
LOG_KEYS = ("loss", "mse_a", "mse_b", "l0", "ev_a", "ev_b")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the last good checkpoint is kept."""


def n_steps(cfg: TrainConfig) -> int:
    return max(1, cfg.tokens // cfg.batch_size)


def batch_indices(step: int, batch_size: int, n_rows: int, seed: int) -> np.ndarray:
    """Rows of batch `step`: a window into back-to-back seeded permutations (one per epoch)."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start, n_rows)
        perm = _permutation(n_rows, seed, epoch)
        take = perm[offset: offset + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.sort(np.asarray(out, dtype=np.int64))


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    key = (n_rows, seed, epoch)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(n_rows, generator=gen).numpy()
    return _PERM_CACHE[key]


class LossModule(nn.Module):
    """The training step's loss as a forward pass, for DistributedDataParallel to wrap.

    DDP averages the gradients of work done inside its forward only, and Crosscoder.forward
    returns latents and reconstructions, not the loss (whose L1 term also reads the decoder norms).
    """

    def __init__(self, crosscoder: cc_mod.Crosscoder, cfg: TrainConfig, device: torch.device, world: int = 1):
        super().__init__()
        self.crosscoder = crosscoder
        self.dtype = precision.torch_dtype(cfg.dtype, device)
        self.bf16 = self.dtype == torch.bfloat16
        self.fused = cfg.step == "fused" and fused_loss.supports(crosscoder)
        c = crosscoder.cfg
        self.sparse_below = resolve_sparse_below(cfg, c.d_a, c.d_b, c.dict_size, device, world) if self.fused else 0.0

    def forward(self, x_NA: torch.Tensor, x_NB: torch.Tensor, l1_coeff: float) -> cc_mod.LossParts:
        if self.fused:
            return fused_loss.loss(self.crosscoder, x_NA, x_NB, l1_coeff, self.dtype, self.sparse_below)
        with torch.autocast(x_NA.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.crosscoder.loss(x_NA, x_NB, l1_coeff)


def resolve_sparse_below(cfg: TrainConfig, d_a: int, d_b: int, dict_size: int, device: torch.device | str,
                         world: int = 1) -> float:
    """cfg.sparse_below with auto measured at the crosscoder's shape, one process's share of the batch
    and the step's precision (sparse_probe.py)."""
    return sparse_probe.resolve(cfg.sparse_below, d_a, d_b, dict_size, max(1, cfg.batch_size // world),
                                precision.torch_dtype(cfg.dtype, device), device)


def _loss_fn(model: cc_mod.Crosscoder, cfg: TrainConfig, device: torch.device, world: int = 1):
    """The step's loss in one process; the same through DistributedDataParallel in a process group."""
    module = LossModule(model, cfg, device, world)
    if not process_group.active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel on CPU and CUDA (one pass over each parameter and its state), the
    foreach one elsewhere. Exact resume holds for both: io.restore_optimizer lays restored state
    out like its parameter, which the fused kernel needs."""
    kernel = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kernel)


def train(model: cc_mod.Crosscoder, data: PairedActivations, cfg: TrainConfig, l1_coeff: float,
          out_dir: str | Path, device: torch.device | str = "cpu", desc: str = "train") -> list[dict]:
    """Train `model` on the training rows of `data` until the stopping rule or the token ceiling,
    resuming from out_dir/checkpoint if present (see convergence.py for the rule and the L1 control).

    Writes out_dir/crosscoder.safetensors, crosscoder_config.json, train_log.json and
    convergence.json at the end; returns the log rows. In a process group (WORLD_SIZE > 1) every
    rank calls this with the same arguments; rank 0 alone writes files, and every rank returns the same log.
    """
    out_dir = Path(out_dir)
    rank, world, device = _join_group(cfg, device)
    model.to(device).train()
    opt = make_optimizer(model, cfg, device)
    total = n_steps(cfg)
    process_group.barrier()  # e.g. rank 0 has removed a stale checkpoint before anyone resumes
    step, log, curve, control = resume(model, opt, out_dir / CHECKPOINT_DIR, l1_coeff)
    if step == 0 and cfg.centre_init:
        centre_start(model, data, cfg, device)
    loss_fn = _loss_fn(model, cfg, device, world)
    fired_since = torch.zeros(model.cfg.dict_size, dtype=torch.long, device=device)
    window = dict.fromkeys(LOG_KEYS, 0.0) | {"n": 0}
    t0 = time.perf_counter()
    with tqdm(total=total, initial=step, desc=desc, unit="step", disable=rank != 0) as bar:
        while step < convergence.end_step(control, total, cfg):
            idx = batch_indices(step, cfg.batch_size, data.n_train, cfg.seed)
            mine = idx[rank::world]
            x_a, x_b = (t.to(device) for t in data.train_batch(mine))
            for group in opt.param_groups:
                group["lr"] = convergence.lr_at(step, control, total, cfg)
            lam = convergence.l1_at(step, control, total, cfg)
            parts = loss_fn(x_a, x_b, lam)
            share = len(mine) * world / len(idx)  # 1.0 unless the batch does not split evenly
            numbers = _step_numbers(parts, model, x_a, x_b, share)
            if not math.isfinite(numbers["loss"]):
                raise TrainingError(f"step {step}: loss is {numbers['loss']}; stopped, the last good "
                                    f"checkpoint in {out_dir / CHECKPOINT_DIR} is kept")
            opt.zero_grad(set_to_none=True)
            _scaled(parts.total, share).backward()
            opt.step()
            model.post_step()
            if cfg.target_l0 is not None and model.steered_by_l1 and step >= cfg.l1_warmup_frac * total:
                control.l1 = convergence.next_l1(control.l1, numbers["l0"], cfg.target_l0, cfg.l1_rate)
            step += 1
            _accumulate(window, numbers, len(idx), fired_since)
            if step % cfg.eval_interval() == 0:
                batch = (x_a, x_b) if world == 1 else None  # one process: this step's rows are the whole batch
                _heldout_point(model, opt, data, cfg, step, idx, curve, control, total, device, batch)
            convergence.after_step(control, step, total, cfg)
            end = convergence.end_step(control, total, cfg)
            if step % cfg.log_every == 0 or step == end:
                log.append(_log_row(window, step, cfg, lam, opt, fired_since, t0))
                _show(bar, log[-1])
            if step % cfg.checkpoint_every == 0 and step < end:
                if rank == 0:
                    save_checkpoint(model, opt, step, log, out_dir / CHECKPOINT_DIR, curve, control)
                process_group.barrier()
            bar.update(1)
    del loss_fn  # drops DDP's gradient hooks from the parameters
    _finish(model, data, cfg, step, log, curve, control, out_dir, device, rank == 0)
    return log


def _join_group(cfg: TrainConfig, device: torch.device | str) -> tuple[int, int, torch.device]:
    """Rank, world size and this rank's device (one process: 0, 1 and `device`); the process set up to train."""
    allocator.retain_freed_memory()  # each step's big temporaries reuse freed pages (no fresh page faults)
    rank, world = process_group.init_from_env(device)
    if cfg.batch_size < world:
        raise ValueError(f"train.batch_size: {cfg.batch_size} is smaller than the {world} processes; "
                         "accepted: at least one row per process")
    return rank, world, process_group.local_device(device)


def _show(bar: tqdm, row: dict) -> None:
    """The progress bar's numbers: the last log row's loss, L0 and explained variances."""
    bar.set_postfix(loss=f"{row['loss']:.3g}", l0=f"{row['l0']:.0f}",
                    ev_a=f"{row['ev_a']:.2f}", ev_b=f"{row['ev_b']:.2f}")


def _finish(model: cc_mod.Crosscoder, data: PairedActivations, cfg: TrainConfig, step: int, log: list[dict],
            curve: list[dict], control: convergence.Control, out_dir: Path, device: torch.device,
            writes: bool) -> None:
    """The last held-out point, then (rank 0) the crosscoder, log and curve written, the checkpoint removed."""
    total = n_steps(cfg)
    if not curve or curve[-1]["tokens"] != step * cfg.batch_size:
        curve.append(heldout_row(model, data, cfg, step, device)[0])
    if writes:
        model.save(out_dir)
        io.write_json(out_dir / LOG_FILE, log, digits=6)
        io.write_json(out_dir / CURVE_FILE, convergence_record(curve, control, step, total, cfg), digits=6)
        remove_checkpoints(out_dir / CHECKPOINT_DIR)
    process_group.barrier()


CENTRE_ROWS = 16_384
"""Training rows whose mean starts the biases (centre_init): the rows of the first batches."""


def centre_start(model: cc_mod.Crosscoder, data: PairedActivations, cfg: TrainConfig,
                 device: torch.device) -> None:
    """Centre the fresh crosscoder on the mean of the first CENTRE_ROWS training rows (the same
    rows on every rank: a pure function of the seed)."""
    idx = batch_indices(0, min(CENTRE_ROWS, data.n_train), data.n_train, cfg.seed)
    x_a, x_b = data.get(np.sort(data.train_rows[idx]))  # not train_batch: that is a step's read
    model.centre(x_a.double().mean(0).float().to(device), x_b.double().mean(0).float().to(device))


def heldout_row(model: cc_mod.Crosscoder, data: PairedActivations, cfg: TrainConfig, step: int,
                device: torch.device) -> tuple[dict, torch.Tensor]:
    """One point of the convergence curve (held-out explained variance, L0 and dead share) and the
    per-latent held-out firing rate."""
    ev = evaluate(model, data, cfg.eval_tokens, device=device)
    model.train()
    return {"step": step, "tokens": step * cfg.batch_size, "ev_a": ev["explained_variance"]["A"],
            "ev_b": ev["explained_variance"]["B"], "l0": ev["l0"], "dead_fraction": ev["dead_fraction"]}, \
        ev["fire_rate"]


def _heldout_point(model, opt, data: PairedActivations, cfg: TrainConfig, step: int, idx: np.ndarray,
                   curve: list[dict], control: convergence.Control, total: int, device: torch.device,
                   batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Evaluate on held-out tokens, resample dead latents (until 3/4 through the decay), check the rule.

    Resampling draws from the global batch `idx`: `batch` when the caller holds it, else read again
    (in a process group each rank holds only its share, and every rank must resample alike)."""
    row, fire_rate = heldout_row(model, data, cfg, step, device)
    dead = fire_rate == 0
    window_open = convergence.resamples_at(step, control, total, cfg)
    if cfg.resample and window_open and resample.supports(model) and dead.any():
        x_a, x_b = batch or tuple(t.to(device) for t in data.train_batch(idx))
        row["resampled"] = resample.resample(model, opt, dead, x_a, x_b, seed=cfg.seed * 1_000_003 + step,
                                                max_share=cfg.resample_max)
    curve.append(row)
    convergence.after_eval(control, curve, step, total, cfg)


def convergence_record(curve: list[dict], control: convergence.Control, step: int, total: int,
                       cfg: TrainConfig) -> dict:
    """What convergence.json holds: the verdict, the tokens used, the rule and the held-out curve."""
    return {"converged": control.converged, "tokens": step * cfg.batch_size,
            "token_ceiling": total * cfg.batch_size, "decay_start_tokens":
            None if control.decay_start is None else control.decay_start * cfg.batch_size,
            "final_l1_coeff": control.l1, "rule": control.rule,
            "stopping_rule": {"converge_gain": cfg.converge_gain, "converge_window": cfg.converge_window,
                              "min_frac": cfg.min_frac, "target_l0": cfg.target_l0},
            "curve": curve}


def _scaled(loss: torch.Tensor, share: float) -> torch.Tensor:
    """The loss weighted by this rank's share of the batch (DDP averages over ranks; 1.0: untouched)."""
    return loss if share == 1.0 else loss * share


def _step_numbers(parts, model, x_a, x_b, share: float) -> dict:
    """One step's log numbers, from the loss's own forward pass; over the global batch in a group.

    In a process group each rank's numbers are weighted by its share of the batch and summed over
    ranks (one all-reduce, which also makes every rank see the same non-finite loss): loss, MSEs
    and L0 are then those of the global batch; explained variance is the row-weighted mean of the
    per-rank values; `fired` is any rank's.
    """
    with torch.no_grad():
        n = x_a.shape[0]
        fired = parts.fired if parts.fired is not None else (model(x_a, x_b)[0] > 0).any(0)
        row = [parts.total.item(), parts.mse_a.item(), parts.mse_b.item(), parts.l0.item()]
        row += [1 - row[1] * n / total_variance(x_a).item(), 1 - row[2] * n / total_variance(x_b).item()]
        if not process_group.active():
            return dict(zip(LOG_KEYS, row), fired=fired)
        world = torch.distributed.get_world_size()
        vec = torch.cat([torch.tensor(row, dtype=torch.float64) * (share / world),
                         fired.double().cpu()]).to(fired.device)
        torch.distributed.all_reduce(vec)
        return dict(zip(LOG_KEYS, vec[:len(LOG_KEYS)].tolist()), fired=vec[len(LOG_KEYS):] > 0)


def _accumulate(window: dict, numbers: dict, n: int, fired_since: torch.Tensor) -> None:
    """Add one step's numbers (of a batch of n rows) to the running log window."""
    for key in LOG_KEYS:
        window[key] += numbers[key]
    window["n"] += 1
    fired_since.add_(n).masked_fill_(numbers["fired"], 0)


def _log_row(window: dict, step: int, cfg: TrainConfig, lam: float, opt, fired_since, t0) -> dict:
    n = max(1, window["n"])
    row = {k: window[k] / n for k in LOG_KEYS}
    row.update(step=step, tokens=step * cfg.batch_size, l1_coeff=lam, lr=opt.param_groups[0]["lr"],
               dead_fraction=(fired_since >= 100_000).float().mean().item(),
               seconds=round(time.perf_counter() - t0, 1))
    for k in list(window):
        window[k] = 0.0 if k != "n" else 0
    return row
