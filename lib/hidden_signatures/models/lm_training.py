"""The shared, resumable training loop for language models (fine-tuning and distillation).

`run` trains a HF causal LM in place with AdamW (fp32 master weights, bf16 autocast),
linear warm-up then cosine decay, and a caller-supplied `step_fn(model, batch_BT) -> (loss,
logged floats)`. The batch order and every random draw inside `step_fn` are functions of
(seed, step) alone, so a run resumed from a checkpoint ends with the same weights, bit for
bit on CPU, as an uninterrupted one. Checkpoints are safetensors + JSON (no pickles).

Layout of `out_dir`:
    checkpoints/step_000200/  model.safetensors, optimizer.safetensors, state.json
    log.csv, log.json         one row every `log_every` steps
    model/                    the finished HF directory (+ train_config.json); see is_complete
"""

from __future__ import annotations

import csv
import json
import io as _stdio
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import allocator, io, precision
from .peak_memory import PeakMemory

StepFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
TRAIN_CONFIG = "train_config.json"
AUTOCAST_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}
"""Autocast settings; auto is resolved per device by precision.resolve (bf16 where native, else fp32)."""


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a setting on `device` (None: autocast off, plain fp32)."""
    if setting not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype={setting!r}: accepted {sorted(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[precision.resolve(setting, device) if setting == precision.AUTO else setting]


@dataclass
class LMTrainConfig:
    """Optimisation settings shared by fine-tuning and distillation."""

    steps: int = 1000
    """Number of optimizer updates."""
    batch_size: int = 8
    """Sequences per update."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    warmup_steps: int = 50
    """Linear warm-up length; cosine decay to `min_lr_ratio * lr` follows."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms or biases)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 0
    """Seeds the batch order and all randomness inside the step function."""
    checkpoint_every: int = 200
    """Write a resumable checkpoint every this many steps."""
    log_every: int = 10
    """Append a log row (means over the interval) every this many steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""
    autocast_dtype: str = "auto"
    """Autocast dtype for forward passes: auto (bf16 where native, else fp32), bfloat16, float16 or float32 (off)."""
    eval_every: int = 0
    """Held-out evaluation (cross-entropy, and for students Jacobian agreement) every this many steps
    and at the end, logged as the learning curve; 0: none."""

    def __post_init__(self) -> None:
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every}: must be an integer >= 0")
        positive = {"steps": self.steps, "batch_size": self.batch_size,
                    "checkpoint_every": self.checkpoint_every, "log_every": self.log_every}
        for name, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"{name}={value}: must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: must be > 0")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be in [0, steps={self.steps}]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype={self.autocast_dtype!r}: accepted {sorted(AUTOCAST_DTYPES)}")


def key_dict(cfg: LMTrainConfig) -> dict[str, Any]:
    """The config's fields for a cache key: those in the class's KEY_OMITS_AT_DEFAULT left out at their default."""
    defaults = {f.name: f.default for f in fields(cfg)}
    omit = getattr(cfg, "KEY_OMITS_AT_DEFAULT", ())
    return {k: v for k, v in asdict(cfg).items() if not (k in omit and v == defaults[k])}


def _config_json(cfg: LMTrainConfig) -> dict[str, Any]:
    """The config as it reads back from JSON, so a saved and a live config compare equal."""
    return json.loads(io.to_json(key_dict(cfg)))


def model_dir(out_dir: str | os.PathLike) -> Path:
    """Where the finished HF model of a run in `out_dir` lives."""
    return Path(out_dir) / MODEL_DIR


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` holds a finished model directory (it is renamed into place last)."""
    return (model_dir(out_dir) / TRAIN_CONFIG).is_file()


def lr_at(step: int, cfg: LMTrainConfig) -> float:
    """Learning rate of the 0-based update `step`: linear warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def batch_indices(step: int, n_seq: int, cfg: LMTrainConfig) -> torch.Tensor:
    """Sequence indices of the 0-based update `step`: one seeded permutation per epoch, last partial batch dropped."""
    per_epoch = n_seq // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"n_seq={n_seq}: need at least batch_size={cfg.batch_size} sequences")
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(_mix(cfg.seed, epoch, salt=1))
    perm = torch.randperm(n_seq, generator=gen)
    return perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]


def _mix(seed: int, step: int, salt: int) -> int:
    """A 63-bit seed from (seed, step, salt), so every step has its own independent stream."""
    return int(io.config_hash([seed, step, salt], length=15), 16)


def make_optimizer(model: nn.Module, cfg: LMTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _param_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named parameters with tied weights listed once (safetensors refuses shared storage)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def _save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any]) -> Path:
    """Write checkpoint `step` into a temporary directory, rename it into place, drop older ones."""
    root = out_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    opt_tensors, opt_meta = io.optimizer_tensors(optimizer)
    io.save_tensors(tmp / "model.safetensors", _param_tensors(model))
    io.save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    io.write_json(tmp / "state.json", {**state, "step": step, "optimizer": opt_meta})
    final = root / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in root.glob("step_*"):
        if old != final:
            shutil.rmtree(old)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    root = Path(out_dir) / CHECKPOINT_DIR
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     cfg: LMTrainConfig) -> dict[str, Any]:
    """Restore weights and optimizer state from `ckpt`; refuse a checkpoint from another config."""
    state = io.read_json(ckpt / "state.json")
    if state["config"] != _config_json(cfg):
        raise ValueError(f"{ckpt}: written with a different training config; delete {ckpt.parent.parent} to restart")
    saved = io.load_tensors(ckpt / "model.safetensors")
    params = dict(model.named_parameters())
    if set(saved) != set(params):
        raise io.ArtifactError(f"{ckpt}: parameter names do not match the model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    io.restore_optimizer(optimizer, io.load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    return state


def _evaluator(eval_fn: EvalFn | None, cfg: LMTrainConfig, seq_len: int):
    """A function of (model, step, seconds) giving the learning-curve rows due at that step ([] or one)."""
    def evaluate(model: nn.Module, step: int, seconds: float) -> list[dict[str, float]]:
        if eval_fn is None or not cfg.eval_every or (step % cfg.eval_every and step != cfg.steps):
            return []
        with torch.no_grad():
            numbers = eval_fn(model)
        model.train()
        return [{"eval_step": step, "tokens": step * cfg.batch_size * seq_len,
                 "train_seconds": round(seconds, 1), **numbers}]
    return evaluate


def curve(rows: list[dict]) -> list[dict]:
    """The learning-curve rows of a training log (those written by the held-out evaluation)."""
    return [row for row in rows if "eval_step" in row]


def step_rows(rows: list[dict]) -> list[dict]:
    """The training rows of a log (means of the per-step numbers over each log interval)."""
    return [row for row in rows if "step" in row]


def _write_logs(out_dir: Path, rows: list[dict[str, float]]) -> None:
    """Write the log rows as log.json and log.csv (columns: union of keys, step first)."""
    io.write_json(out_dir / "log.json", rows)
    keys = sorted({k for row in rows for k in row} - {"step"})
    buf = _stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", *keys], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(out_dir / "log.csv", buf.getvalue())


def _save_final(out_dir: Path, model: nn.Module, tokenizer: Any, summary: dict[str, Any]) -> Path:
    """Save the model as a plain HF directory into a temp dir, then rename it into place."""
    final = model_dir(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".model-tmp-", dir=out_dir))
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    io.write_json(tmp / TRAIN_CONFIG, summary)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _train_step(model: nn.Module, step_fn: StepFn, batch_BT: torch.Tensor, step: int,
                optimizer: torch.optim.Optimizer, cfg: LMTrainConfig) -> dict[str, float]:
    """One update (0-based `step`) with its own seeded RNG stream; raises on a non-finite loss or gradient."""
    device = batch_BT.device
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    dtype = autocast_dtype(cfg.autocast_dtype, device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(_mix(cfg.seed, step, salt=2))
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss, logged = step_fn(model, batch_BT)
        if not torch.isfinite(loss.detach()).all():
            raise ValueError(f"non-finite loss {loss.item()} at step {step + 1}; training stopped, "
                             f"last good checkpoint kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if not torch.isfinite(grad_norm):
        raise ValueError(f"non-finite gradient norm at step {step + 1}; training stopped, last good checkpoint kept")
    optimizer.step()
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr_at(step, cfg),
            **{k: float(v) for k, v in logged.items()}}


EvalFn = Callable[[nn.Module], dict[str, float]]


def run(model: nn.Module, step_fn: StepFn, data_NT: torch.Tensor, cfg: LMTrainConfig,
        out_dir: str | os.PathLike, desc: str = "train", tokenizer: Any = None,
        info: dict[str, Any] | None = None, eval_fn: EvalFn | None = None) -> Path:
    """Train `model` in place (fp32 master weights) with `step_fn`, resuming from the last checkpoint.

    Returns the finished HF model directory; `info` is stored in its train_config.json. With
    cfg.eval_every and `eval_fn`, the log also holds eval_fn's held-out numbers at step 0, every
    eval_every steps and at the end (the learning curve), each with the tokens seen and the seconds.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return model_dir(out_dir)
    if data_NT.dim() != 2 or data_NT.dtype != torch.long:
        raise ValueError(f"data_NT: expected a LongTensor [n_seq, seq_len], got {data_NT.dtype} {tuple(data_NT.shape)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(".model-tmp-*"), *(out_dir / CHECKPOINT_DIR).glob(".tmp-*")]:
        shutil.rmtree(stale)
    model.float().train()
    allocator.retain_freed_memory()  # each step's activations reuse freed pages (no fresh page faults)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    config_json = _config_json(cfg)
    start, rows, seconds_before = 0, [], 0.0
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        state = _load_checkpoint(ckpt, model, optimizer, cfg)
        start, rows = state["step"], state["log_rows"]
        seconds_before = float(state.get("train_seconds", 0.0))  # training time of earlier sessions
    pending: list[dict[str, float]] = []
    step_times: list[float] = []
    evaluate = _evaluator(eval_fn, cfg, data_NT.shape[1])
    if start == 0:
        rows.extend(evaluate(model, 0, 0.0))
    with PeakMemory() as memory, tqdm(total=cfg.steps, initial=start, desc=desc) as bar:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch_BT = data_NT[batch_indices(step, data_NT.shape[0], cfg)].to(device)
            pending.append(_train_step(model, step_fn, batch_BT, step, optimizer, cfg))
            step_times.append(time.perf_counter() - t0)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                rows.append({"step": done, **{k: sum(r[k] for r in pending) / len(pending) for k in pending[0]}})
                pending = []
            rows.extend(evaluate(model, done, seconds_before + sum(step_times)))
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save_checkpoint(out_dir, done, model, optimizer, {"config": config_json, "log_rows": rows,
                                                                       "train_seconds": seconds_before + sum(step_times)})
                _write_logs(out_dir, rows)
    _write_logs(out_dir, rows)
    metrics = {**memory.report(), "mean_step_time_s": sum(step_times) / max(1, len(step_times)),
               "steps_this_session": len(step_times), "resumed_from_step": start,
               "final_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None),
               "train_seconds": round(seconds_before + sum(step_times), 1)}
    summary = {"config": config_json, "info": info or {}, "metrics": metrics, "desc": desc}
    final = _save_final(out_dir, model, tokenizer, summary)
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return final
