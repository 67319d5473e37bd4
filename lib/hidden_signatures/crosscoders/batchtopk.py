"""The BatchTopK crosscoder, a variant beyond the paper's ReLU + L1.

Minder et al. 2025 ("Robustly identifying concepts introduced during chat fine-tuning
using crosscoders") showed that the L1 penalty invents model-exclusive latents
(complete shrinkage, latent decoupling) and that BatchTopK crosscoders avoid much of it.

The class keeps the base interface and parameter names and registers itself in
crosscoder.ARCHITECTURES on import (the crosscoders package imports it). Shapes ride on
names: N tokens, H latents, A/B widths.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import fused_loss
from .crosscoder import Crosscoder, CrosscoderConfig, LossParts, register

THRESHOLD_BETA = 0.99
"""EMA weight of the old inference threshold (a window of ~100 steps suits short runs)."""
DEAD_AFTER_TOKENS = 1_000_000
"""A latent is dead once it has not fired for this many training tokens (AuxK)."""
SAMPLE_STRIDE = 16
"""Batch top-k estimates its cut from every SAMPLE_STRIDE-th token (see `top_entries`)."""


@register
class BatchTopKCrosscoder(Crosscoder):
    """Crosscoder keeping the k * N largest decoder-norm-scaled activations of each batch.

    Training mode: ReLU pre-activations are ranked by f_i * (|d_A,i| + |d_B,i|) over the
    whole batch and all but the top k * N are zeroed. Eval mode: a latent is on where its
    scaled activation exceeds `threshold`, an EMA of the smallest kept scaled activation.
    Loss: MSE_A + MSE_B + aux_coeff * AuxK (dead-latent) loss; the L1 coefficient passed
    to `loss` is ignored (sparsity comes from top-k), and `sparsity` is only logged.
    """

    architecture: ClassVar[str] = "batchtopk"
    steered_by_l1: ClassVar[bool] = False  # k sets L0
    default_dec_init_norm: ClassVar[float] = 0.5
    """Ranking is by f * (|d_A| + |d_B|), so a latent the first batches skip keeps its initial norm
    while the chosen ones grow to ~1 and outrank it for good: at 0.08 half the dictionary died in the
    first 30 steps (51% dead on the fine-tuned pair's middle block); at 0.5, 1.8% (docs/training.md)."""
    resample_dec_scale: ClassVar[float] = 1.0
    """Ranking is by f * decoder norm: a resampled latent at a fraction of the live norm never wins a slot."""

    def __init__(self, cfg: CrosscoderConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)
        if not 0 < cfg.k <= cfg.dict_size:
            raise ValueError(f"crosscoder.k: {cfg.k!r} must be in 1..dict_size ({cfg.dict_size})")
        if cfg.aux_k <= 0:
            raise ValueError(f"crosscoder.aux_k: {cfg.aux_k!r} is not a positive integer")
        self.threshold_beta = float(getattr(cfg, "threshold_beta", THRESHOLD_BETA))
        self.dead_after_tokens = int(getattr(cfg, "dead_after_tokens", DEAD_AFTER_TOKENS))
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet
        self.register_buffer("num_tokens_since_fired",
                             torch.zeros(cfg.dict_size, dtype=torch.long))

    # -- encoding --------------------------------------------------------------------------
    def scaled_acts(self, x_NA: torch.Tensor, x_NB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ReLU pre-activations [N, H] and the same scaled by |d_A|+|d_B| (fp32, for ranking)."""
        relu_NH = torch.relu(self.pre_acts(x_NA, x_NB))
        return relu_NH, relu_NH.float() * self.norm_sum().float()

    @torch.no_grad()
    def norm_sum(self) -> torch.Tensor:
        """|d_A,i| + |d_B,i| per latent, [H], detached (it ranks and weights, never trains)."""
        norm_a_H, norm_b_H = self.decoder_norms()
        return norm_a_H + norm_b_H

    def batch_topk(self, relu_NH: torch.Tensor, scaled_NH: torch.Tensor) -> torch.Tensor:
        """Keep the k * N entries of largest scaled activation across the batch, zero the rest."""
        return keep_entries(relu_NH, self.top_index(scaled_NH))

    def top_index(self, scaled_NH: torch.Tensor) -> torch.Tensor:
        """Flat indices of the k * N largest scaled activations of the batch."""
        return top_entries(scaled_NH, min(self.cfg.k * scaled_NH.shape[0], scaled_NH.numel()))

    def thresholded(self, relu_NH: torch.Tensor, scaled_NH: torch.Tensor) -> torch.Tensor:
        """Inference code: keep entries whose scaled activation exceeds the learned threshold."""
        return relu_NH * (scaled_NH > self.threshold)

    def _codes(self, x_NA: torch.Tensor, x_NB: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sparse f, ReLU pre-activations, scaled ranks), all [N, H], and f's flat nonzero indices."""
        relu_NH, scaled_NH = self.scaled_acts(x_NA, x_NB)
        if self.training or self.threshold < 0:  # no threshold yet: fall back to top-k
            idx = self.top_index(scaled_NH)
            with torch.no_grad():
                active = idx[relu_NH.flatten()[idx] > 0]  # f > 0: kept and ReLU-positive
            return keep_entries(relu_NH, idx), relu_NH, scaled_NH, active
        f_NH = self.thresholded(relu_NH, scaled_NH)
        return f_NH, relu_NH, scaled_NH, (f_NH.detach().flatten() > 0).nonzero().squeeze(1)

    def encode(self, x_NA: torch.Tensor, x_NB: torch.Tensor) -> torch.Tensor:
        """Sparse latents f [N, H]: batch top-k in train mode, threshold in eval mode."""
        return self._codes(x_NA, x_NB)[0]

    # -- training statistics ---------------------------------------------------------------
    @torch.no_grad()
    def update_stats(self, fired_H: torch.Tensor, n_tokens: int, kept_scaled: torch.Tensor) -> None:
        """Advance dead-latent counters and the threshold EMA (kept_scaled: ranks of f's nonzeros)."""
        self.num_tokens_since_fired += n_tokens
        self.num_tokens_since_fired[fired_H] = 0
        min_kept = kept_scaled.min() if kept_scaled.numel() else torch.zeros((), device=kept_scaled.device)
        if self.threshold < 0:
            self.threshold.fill_(min_kept.item())
        else:
            beta = self.threshold_beta
            self.threshold.mul_(beta).add_((1 - beta) * min_kept.to(self.threshold.dtype))

    @staticmethod
    @torch.no_grad()
    def batch_numbers(kept_scaled: torch.Tensor, active: torch.Tensor, N: int, H: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fired latents [H], decoder-weighted L1, L0) of a batch from f's flat nonzero indices.

        kept_scaled holds the scaled activations there: f * (|d_A| + |d_B|), as f = ReLU where kept.
        """
        fired_H = torch.zeros(H, dtype=torch.bool, device=active.device).index_fill_(0, active % H, True)
        return fired_H, kept_scaled.sum() / N, torch.tensor(active.numel() / N, device=active.device)

    def dead_mask(self) -> torch.Tensor:
        """Bool [H]: latents that have not fired for `dead_after_tokens` training tokens."""
        return self.num_tokens_since_fired >= self.dead_after_tokens

    def aux_loss(self, err_NA: torch.Tensor, err_NB: torch.Tensor,
                 relu_NH: torch.Tensor, scaled_NH: torch.Tensor) -> torch.Tensor:
        """AuxK: reconstruct the (detached) residual error with the top aux_k dead latents.

        Squared error over both models divided by the residual's total variance (OpenAI's
        normalisation); exactly 0 when no latent is dead. Only the dead columns are ranked
        and decoded (the others could never be picked).
        """
        dead = self.dead_mask().nonzero().squeeze(1)
        if dead.numel() == 0:
            return torch.zeros((), device=relu_NH.device)
        idx_NK = scaled_NH[:, dead].topk(min(self.cfg.aux_k, dead.numel()), dim=-1, sorted=False).indices
        relu_ND = relu_NH[:, dead]
        aux_ND = torch.zeros_like(relu_ND).scatter(-1, idx_NK, relu_ND.gather(-1, idx_NK))
        err_NX = torch.cat([err_NA, err_NB], dim=-1).float().detach()
        rec_NX = torch.cat([aux_ND @ self.W_dec_A[dead], aux_ND @ self.W_dec_B[dead]], dim=-1).float()
        sse = (err_NX - rec_NX).pow(2).sum(-1).mean()
        var = (err_NX - err_NX.mean(0)).pow(2).sum(-1).mean()
        return (sse / var).nan_to_num(0.0)

    sparse_below: float = fused_loss.SPARSE_BELOW
    """The loss decodes only the kept entries (decode_active) when they are fewer than this share."""

    def decode_active(self, relu_NH: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """decode(f) from f's ascending flat nonzero indices only: an embedding bag per token, so the
        decoder's forward and its two gradient products cost nnz x d instead of N x H x d."""
        N, H = relu_NH.shape
        vals = relu_NH.flatten()[active]
        offsets = fused_loss.row_starts(active // H, N)[:-1]  # where each token's kept entries start
        return tuple(F.embedding_bag(active % H, W.to(vals.dtype), offsets, mode="sum", per_sample_weights=vals)
                     + b for W, b in ((self.W_dec_A, self.b_dec_A), (self.W_dec_B, self.b_dec_B)))

    # -- loss --------------------------------------------------------------------------------
    def loss(self, x_NA: torch.Tensor, x_NB: torch.Tensor, l1_coeff: float = 0.0) -> LossParts:
        """MSE_A + MSE_B + aux_coeff * AuxK; l1_coeff is ignored (kept for the shared interface).

        A training-mode call with gradients enabled also advances the dead-latent counters
        and the threshold EMA (as the dictionary_learning trainer does inside its loss).
        Statistics come from f's nonzero indices, never from a pass over [N, H].
        """
        f_NH, relu_NH, scaled_NH, active = self._codes(x_NA, x_NB)
        sparse = active.numel() < self.sparse_below * f_NH.numel()
        xhat_NA, xhat_NB = self.decode_active(relu_NH, active) if sparse else self.decode(f_NH)
        err_NA, err_NB = x_NA.float() - xhat_NA.float(), x_NB.float() - xhat_NB.float()
        mse_a = err_NA.pow(2).sum(-1).mean()
        mse_b = err_NB.pow(2).sum(-1).mean()
        kept_scaled = scaled_NH.detach().flatten()[active]
        fired_H, sparsity, l0 = self.batch_numbers(kept_scaled, active, *f_NH.shape)
        if self.training and torch.is_grad_enabled():
            self.update_stats(fired_H, f_NH.shape[0], kept_scaled)
        aux = self.aux_loss(err_NA, err_NB, relu_NH, scaled_NH)
        total = mse_a + mse_b + self.cfg.aux_coeff * aux
        return LossParts(total=total, mse_a=mse_a, mse_b=mse_b, sparsity=sparsity,
                         l0=l0, aux=aux.detach(), fired=fired_H)

    def post_step(self) -> None:
        """Nothing to do after an optimiser step: statistics advance inside `loss`."""

    @torch.no_grad()
    def resampled(self, dead: torch.Tensor) -> None:
        """A resampled latent starts a new life: its silence counter restarts."""
        self.num_tokens_since_fired[dead] = 0


def top_entries(scores_NH: torch.Tensor, n_keep: int, stride: int = SAMPLE_STRIDE) -> torch.Tensor:
    """Ascending flat indices of the n_keep largest entries; ties at the cut go to the lowest.

    The set of flatten().topk(n_keep) up to which equal values at the cut are kept (topk
    leaves that unspecified; here it is the lowest flat indices, i.e. the earliest tokens).
    NaN ranks as largest, as in topk. A full topk over N * H entries is slow on CPU (a
    heap-based partial sort), so it runs on the candidates of `candidates` only.
    """
    if n_keep == 0:
        return torch.zeros(0, dtype=torch.long, device=scores_NH.device)
    cand = candidates(scores_NH, n_keep, stride)
    vals = scores_NH.flatten()[cand].nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    cut = vals.topk(n_keep, sorted=False).values.min()
    above, tied = vals > cut, vals == cut
    return cand[above | (tied & (tied.cumsum(0) <= n_keep - above.sum()))]


def candidates(scores_NH: torch.Tensor, n_keep: int, stride: int) -> torch.Tensor:
    """Ascending flat indices of a superset of the n_keep largest entries (and of their ties).

    Every stride-th row gives a floor that about 2 * n_keep entries reach; if at least n_keep
    reach it, the n_keep largest are among them. Otherwise (a skewed batch): all entries.
    """
    flat = scores_NH.flatten()
    cand = (flat < sampled_floor(scores_NH, n_keep, stride)).logical_not_().nonzero().squeeze(1)
    return cand if cand.numel() >= n_keep else torch.arange(flat.numel(), device=flat.device)


def sampled_floor(scores_NH: torch.Tensor, n_keep: int, stride: int) -> torch.Tensor:
    """A value that about 2 * n_keep entries of scores_NH reach, from every stride-th row."""
    sample_MH = scores_NH[::stride]
    rank = min(sample_MH.numel(), 2 * -(-n_keep * sample_MH.shape[0] // scores_NH.shape[0]))
    return sample_MH.flatten().topk(rank, sorted=False).values.min()


def keep_entries(x_NH: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x with every entry but those at flat indices idx set to 0 (x * a 0/1 mask)."""
    keep = torch.zeros(x_NH.numel(), dtype=torch.bool, device=x_NH.device)
    keep[idx] = True
    return x_NH * keep.view_as(x_NH)
