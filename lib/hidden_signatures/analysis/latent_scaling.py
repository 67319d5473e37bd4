"""Latent Scaling (Minder et al. 2025): how much of each latent's decoder direction each model's
activations actually carry, accumulated over batches of tokens.

Shapes ride on names: N tokens, H latents, K selected latents, A/B the two models' widths.
"""

from __future__ import annotations

from typing import Literal

import torch

from .metric_checks import check_decoders

Direction = Literal["own", "A", "B"]


# -- latent scaling (Minder et al. 2025) ---------------------------------------------------------
class LatentScalingAccumulator:
    """Streams token chunks into the sums that Latent Scaling's closed-form betas need.

    For latent i with activations f_ni and fit direction v_i, the least-squares scale of
    the target y_n is beta_i = sum_n f_ni <v_i, y_n> / (|v_i|^2 sum_n f_ni^2). Per model
    only the K scalars sum_n f_ni <v_i, x_n>, sum_n f_ni <v_i, recon_n> and sum_n f_ni^2 are
    kept, so memory is O(chunk x K) and any N works. See `latent_scaling` for the targets.
    """

    def __init__(self, W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor,
                 latents: torch.Tensor | None = None, direction: Direction = "own"):
        W_A, W_B = check_decoders(W_dec_HA, W_dec_HB, "latent_scaling")
        H = W_A.shape[0]
        idx = torch.arange(H) if latents is None else torch.as_tensor(latents).long().flatten()
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= H:
            raise ValueError(f"latent_scaling: latents must be non-empty indices in [0, {H})")
        self.latents, self.H = idx, H
        self.d_A, self.d_B = W_A[idx], W_B[idx]  # decoders the reconstructions were built with
        self.v_A, self.v_B = self._directions(direction)
        K = idx.numel()
        zeros = lambda: torch.zeros(K, dtype=torch.float64)  # noqa: E731
        self.sum_f2, self.count = zeros(), torch.zeros(K, dtype=torch.long)
        self.num_x = {"A": zeros(), "B": zeros()}
        self.num_r = {"A": zeros(), "B": zeros()}
        self.has_recon: dict[str, bool | None] = {"A": None, "B": None}

    def _directions(self, direction: Direction) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit directions per model: each model's own rows, or one model's rows for both."""
        if direction == "own":
            return self.d_A, self.d_B
        if direction not in ("A", "B"):
            raise ValueError(f"latent_scaling: direction {direction!r} is not 'own', 'A' or 'B'")
        if self.d_A.shape[1] != self.d_B.shape[1]:
            raise ValueError(f"latent_scaling: direction={direction!r} needs dA == dB, got "
                             f"{self.d_A.shape[1]} and {self.d_B.shape[1]}")
        v = self.d_A if direction == "A" else self.d_B
        return v, v

    def _side(self, side: str, f_NK: torch.Tensor, x_N: torch.Tensor,
              recon_N: torch.Tensor | None) -> None:
        """Add one model's numerators for this chunk."""
        d = self.d_A.shape[1] if side == "A" else self.d_B.shape[1]
        if x_N.shape != (f_NK.shape[0], d):
            raise ValueError(f"latent_scaling: x_N{side} has shape {tuple(x_N.shape)}; expected "
                             f"({f_NK.shape[0]}, {d})")
        has = recon_N is not None
        if self.has_recon[side] is not None and self.has_recon[side] != has:
            raise ValueError(f"latent_scaling: recon_N{side} given for some chunks but not others")
        self.has_recon[side] = has
        v = self.v_A if side == "A" else self.v_B
        self.num_x[side] += (f_NK * (x_N.detach().cpu().double() @ v.T)).sum(0)
        if has:
            if recon_N.shape != x_N.shape:
                raise ValueError(f"latent_scaling: recon_N{side} shape {tuple(recon_N.shape)} "
                                 f"differs from x_N{side} {tuple(x_N.shape)}")
            self.num_r[side] += (f_NK * (recon_N.detach().cpu().double() @ v.T)).sum(0)

    def update(self, f_NH: torch.Tensor, x_NA: torch.Tensor, x_NB: torch.Tensor,
               recon_NA: torch.Tensor | None = None, recon_NB: torch.Tensor | None = None) -> None:
        """Add one chunk of tokens (latent activations, activations, optional reconstructions)."""
        if f_NH.ndim != 2 or f_NH.shape[1] != self.H:
            raise ValueError(f"latent_scaling: f_NH has shape {tuple(f_NH.shape)}; expected "
                             f"(N, {self.H})")
        f_NK = f_NH.detach().cpu()[:, self.latents].double()
        self.sum_f2 += (f_NK**2).sum(0)
        self.count += (f_NK != 0).sum(0)
        self._side("A", f_NK, x_NA, recon_NA)
        self._side("B", f_NK, x_NB, recon_NB)

    def result(self) -> dict[str, torch.Tensor]:
        """Betas and ratios per selected latent (NaN where a latent never fired); see latent_scaling."""
        out = {"latents": self.latents, "count_active": self.count.clone(),
               "sum_f2": self.sum_f2.clone()}
        for side, v, d in (("A", self.v_A, self.d_A), ("B", self.v_B, self.d_B)):
            den = (v**2).sum(1) * self.sum_f2
            safe = torch.where(den > 0, den, torch.ones_like(den))
            nan = torch.full_like(den, float("nan"))
            ratio = lambda num: torch.where(den > 0, num / safe, nan)  # noqa: E731
            out[f"beta_{side}"] = ratio(self.num_x[side])
            if self.has_recon[side]:
                out[f"beta_recon_{side}"] = ratio(self.num_r[side])
                removed = (v * d).sum(1) * self.sum_f2  # sum_n f_ni^2 <v_i, d_i>
                out[f"beta_error_{side}"] = ratio(self.num_x[side] - self.num_r[side] + removed)
        for kind in ("recon", "error"):
            if f"beta_{kind}_A" in out and f"beta_{kind}_B" in out:
                out[f"nu_{kind}"] = out[f"beta_{kind}_A"] / out[f"beta_{kind}_B"]
        return out


def latent_scaling(f_NH: torch.Tensor, W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor,
                   x_NA: torch.Tensor, x_NB: torch.Tensor, recon_NA: torch.Tensor | None = None,
                   recon_NB: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                   direction: Direction = "own", chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Latent Scaling (Minder et al. 2025): how strongly each latent's direction is present per model.

    For latent i (over `latents`, default all H) and model M in {A, B}, with v_Mi the fit
    direction (direction="own": W_dec_M[i]; "A"/"B": that model's row for both models,
    Minder's choice, needs dA == dB) and d_Mi = W_dec_M[i]:
      beta_M[i]       = sum_n f_ni <v_Mi, x_nM> / (|v_Mi|^2 sum_n f_ni^2)     target x
      beta_recon_M[i] = same with recon_nM as target                        ('reconstruction')
      beta_error_M[i] = same with x_nM - recon_nM + f_ni d_Mi as target       ('error')
      nu_recon = beta_recon_A / beta_recon_B,  nu_error = beta_error_A / beta_error_B
    With A = base and B = fine-tuned these are Minder's nu^r and nu^eps for B-specific
    latents (small nu: truly absent from A); for A-specific latents read 1 / nu.
    recon_NM must be the crosscoder's reconstruction built with W_dec_M (bias included or
    not, as long as x_NM matches). Also returns latents, count_active (tokens with f != 0)
    and sum_f2. Latents that never fire get NaN. Rows are processed chunk_size at a time;
    stream larger data through LatentScalingAccumulator directly.
    """
    if chunk_size < 1:
        raise ValueError(f"latent_scaling: chunk_size must be >= 1, got {chunk_size}")
    acc = LatentScalingAccumulator(W_dec_HA, W_dec_HB, latents, direction)
    n = f_NH.shape[0]
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        acc.update(f_NH[sl], x_NA[sl], x_NB[sl],
                   None if recon_NA is None else recon_NA[sl],
                   None if recon_NB is None else recon_NB[sl])
    return acc.result()
