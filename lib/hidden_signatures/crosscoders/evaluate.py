"""Held-out numbers of a crosscoder: explained variance per model, L0, dead share, per-latent activation.

Kept apart from the trainer so that analysis reads a crosscoder without importing its training.
"""

from __future__ import annotations

import numpy as np
import torch

from ..harvest.store import PairedActivations
from . import crosscoder as cc_mod


def explained_variance(x_NA: torch.Tensor, xhat_NA: torch.Tensor) -> torch.Tensor:
    """1 - SSE / total variance (summed over dims), per PAPER.md."""
    return 1 - (x_NA - xhat_NA).pow(2).sum() / total_variance(x_NA)


def total_variance(x_NA: torch.Tensor) -> torch.Tensor:
    """Summed per-dimension variance of a batch (the denominator of explained variance)."""
    return (x_NA - x_NA.mean(0)).pow(2).sum()


@torch.no_grad()
def evaluate(model: cc_mod.Crosscoder, data: PairedActivations, max_tokens: int, batch_size: int = 4096,
             device: torch.device | str = "cpu") -> dict:
    """Held-out numbers: per-latent mean activation, explained variance per model, L0, dead share."""
    device = torch.device(device)
    model.to(device).eval()
    idx = data.eval_indices(max_tokens)
    H = model.cfg.dict_size
    act_sum = torch.zeros(H, dtype=torch.float64)
    fire_count = torch.zeros(H, dtype=torch.float64)
    sums = {"sse_a": 0.0, "sse_b": 0.0, "l0": 0.0}
    for start in range(0, len(idx), batch_size):
        x_a, x_b = (t.to(device) for t in data.get(idx[start: start + batch_size]))
        f, xa_hat, xb_hat = model(x_a, x_b)
        act_sum += f.double().sum(0).cpu()
        fire_count += (f > 0).double().sum(0).cpu()
        sums["sse_a"] += (x_a - xa_hat).double().pow(2).sum().item()
        sums["sse_b"] += (x_b - xb_hat).double().pow(2).sum().item()
        sums["l0"] += (f > 0).double().sum().item()
    n = len(idx)
    tot_a, tot_b = _total_variance(data, idx, batch_size)
    mean_act = act_sum / n
    return {"mean_act": mean_act.float(), "fire_rate": (fire_count / n).float(),
            "explained_variance": {"A": 1 - sums["sse_a"] / tot_a, "B": 1 - sums["sse_b"] / tot_b},
            "l0": sums["l0"] / n, "dead_fraction": (mean_act == 0).double().mean().item(),
            "eval_tokens": n}


def _total_variance(data: PairedActivations, idx: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Summed per-dimension variance of the scaled eval rows of both models (two-pass, fp64)."""
    means, totals = [], []
    for side in (0, 1):
        s = sum(data.get(idx[i: i + batch_size])[side].double().sum(0) for i in range(0, len(idx), batch_size))
        means.append(s / len(idx))
    for side in (0, 1):
        totals.append(sum((data.get(idx[i: i + batch_size])[side].double() - means[side]).pow(2).sum().item()
                          for i in range(0, len(idx), batch_size)))
    return totals[0], totals[1]
