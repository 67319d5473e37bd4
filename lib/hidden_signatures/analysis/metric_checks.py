"""Argument checks shared by the metric families: decoders, per-latent vectors, live masks and samples
become detached float64 (or CPU) tensors, or a ValueError naming the metric and the argument."""

from __future__ import annotations

import torch

def check_decoders(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, fn: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both decoders as detached float64 [H, d] matrices with the same H, or ValueError."""
    if W_dec_HA.ndim != 2 or W_dec_HB.ndim != 2:
        raise ValueError(f"{fn}: decoders must be 2-D [H, d], got shapes "
                         f"{tuple(W_dec_HA.shape)} and {tuple(W_dec_HB.shape)}")
    if W_dec_HA.shape[0] != W_dec_HB.shape[0]:
        raise ValueError(f"{fn}: decoders have different numbers of latents "
                         f"{W_dec_HA.shape[0]} and {W_dec_HB.shape[0]}; they must match")
    return W_dec_HA.detach().cpu().double(), W_dec_HB.detach().cpu().double()


def check_vector(t: torch.Tensor, H: int, fn: str, name: str) -> torch.Tensor:
    """`t` as a detached float64 vector of length H, or ValueError."""
    if t.shape != (H,):
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected ({H},)")
    return t.detach().cpu().double()


def check_mask(live_mask_H: torch.Tensor | None, H: int, fn: str) -> torch.Tensor:
    """A boolean live mask of length H (all True when None), or ValueError."""
    if live_mask_H is None:
        return torch.ones(H, dtype=torch.bool)
    if live_mask_H.dtype != torch.bool or live_mask_H.shape != (H,):
        raise ValueError(f"{fn}: live_mask_H must be a bool tensor of shape ({H},), got "
                         f"{live_mask_H.dtype} {tuple(live_mask_H.shape)}")
    return live_mask_H.detach().cpu()


def check_mean_act(mean_act_H: torch.Tensor, H: int, fn: str) -> torch.Tensor:
    """Mean activations as float64 [H]; negative or non-finite values are a ValueError."""
    a_H = check_vector(mean_act_H, H, fn, "mean_act_H")
    if not torch.isfinite(a_H).all() or (a_H < 0).any():
        raise ValueError(f"{fn}: mean_act_H must be finite and >= 0 (min {a_H.min().item():g})")
    return a_H


def check_samples(X: torch.Tensor, name: str, fn: str) -> torch.Tensor:
    """A 2-D [N, d] sample matrix with N >= 2, or ValueError."""
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"{fn}: {name} must be 2-D [N, d] with N >= 2, got {tuple(X.shape)}")
    return X.detach().cpu()
