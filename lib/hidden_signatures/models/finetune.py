"""Fine-tune a base causal LM on a token set with the plain next-token loss.

This produces the "fine-tuning" relationship offline: SmolLM2 vs SmolLM2 fine-tuned here on
the corpus. The caller chooses `out_dir` (use `finetune_key` in its name); a finished
directory is returned at once.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import io
from . import lm_training, logit_losses
from .lm_training import LMTrainConfig, is_complete, model_dir, run


def lm_loss(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (in fp32) of logits at positions 0..T-2 against tokens 1..T-1."""
    logits = logits_BTV[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids_BT[:, 1:].reshape(-1))


def lm_step(model: nn.Module, batch_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The training step of fine-tuning: plain LM loss (taken a chunk of sequences at a time, with
    lm_loss's gradients: logit_losses), nothing extra logged."""
    return logit_losses.lm_loss(model(input_ids=batch_BT).logits, batch_BT), {}


def finetune_key(base_spec: str, data_fingerprint: str, cfg: LMTrainConfig) -> str:
    """A short hash naming a fine-tuning run by its base model, data and training config."""
    return io.config_hash({"kind": "finetune", "base": base_spec, "data": data_fingerprint,
                           "config": asdict(cfg)})


def finetune(model: nn.Module, tokenizer: Any, train_NT: torch.Tensor, cfg: LMTrainConfig,
             out_dir: str | os.PathLike, info: dict[str, Any] | None = None,
             heldout: dict[str, torch.Tensor] | None = None) -> Path:
    """Fine-tune a copy of `model` on `train_NT` and return the saved HF directory (cached when complete).

    `heldout` ({name: sequences}) with cfg.eval_every logs the held-out cross-entropy on each
    against tokens seen (e.g. the fine-tune's own domain and the crosscoder's text).
    """
    if is_complete(out_dir):
        return model_dir(out_dir)
    trainee = copy.deepcopy(model)  # the caller's base model stays untouched (it is model A)

    def numbers(m: nn.Module) -> dict[str, float]:
        return {f"heldout_ce_{name}": heldout_loss(m, ids, autocast_dtype=cfg.autocast_dtype)
                for name, ids in (heldout or {}).items()}
    return run(trainee, lm_step, train_NT, cfg, out_dir, desc="finetune", tokenizer=tokenizer,
               info={"objective": "lm", **(info or {})}, eval_fn=numbers if heldout else None)


@torch.no_grad()
def heldout_loss(model: nn.Module, data_NT: torch.Tensor, batch_size: int = 8,
                 autocast_dtype: str = "auto") -> float:
    """Mean next-token cross entropy of `model` over every predicted token of `data_NT`."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    device = next(model.parameters()).device
    dtype = lm_training.autocast_dtype(autocast_dtype, device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, data_NT.shape[0], batch_size):
            batch_BT = data_NT[start:start + batch_size].to(device)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = model(input_ids=batch_BT).logits
            n_tok = batch_BT.shape[0] * (batch_BT.shape[1] - 1)
            total += float(lm_loss(logits, batch_BT)) * n_tok
            count += n_tok
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"data_NT {tuple(data_NT.shape)}: needs at least one sequence of length >= 2")
    return total / count
