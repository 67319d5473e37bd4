"""Dead-latent resampling (after Anthropic's "Towards Monosemanticity"), for every architecture.

A latent that fires on none of the held-out tokens of an evaluation is dead: its gradient is zero
and it never comes back by itself. Each dead latent is re-aimed at one training row the crosscoder
reconstructs badly (drawn with probability proportional to its squared error, from a generator
seeded by the step): its decoder rows become that row's residual, scaled to the mean live
decoder norm times the model's `resample_dec_scale`, its encoder columns the same direction at ENC_SCALE of the mean live encoder norm,
its bias set so that it fires on as few rows of the batch as an average live latent does (a
zero bias would fire it on every row with a positive projection: the residual stream is far
from centred, and a mass resampling then blows the reconstruction up), its Adam first moment 0
and its second moment the live latents' mean (see _reset_moments). The draw depends only on the weights, the step and the batch,
so a resumed run resamples exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

from . import crosscoder as cc_mod

ENC_SCALE = 0.2
"""New encoder columns start at this share of the mean live encoder column norm (small, so a
resampled latent joins gently)."""
RESAMPLED = ("relu_l1", "dfc", "batchtopk")
"""Architectures whose dead latents are resampled. BatchTopK's AuxK loss alone does not revive
them: its latents die in the first steps, far sooner than AuxK calls a latent dead."""


def supports(model: cc_mod.Crosscoder) -> bool:
    return model.architecture in RESAMPLED


@torch.no_grad()
def resample(model: cc_mod.Crosscoder, opt: torch.optim.Optimizer, dead_H: torch.Tensor,
             x_NA: torch.Tensor, x_NB: torch.Tensor, seed: int, max_share: float = 1.0) -> int:
    """Re-aim the latents in bool mask `dead_H` at badly reconstructed rows of (x_NA, x_NB), at most
    max_share of the dictionary (the first dead ones by index); returns how many."""
    live = ~dead_H.to(model.b_enc.device)
    dead = torch.nonzero(dead_H.to(model.b_enc.device)).flatten()[:max(1, int(max_share * len(dead_H)))]
    if len(dead) == 0 or not live.any():
        return 0
    f_NH, xa_hat, xb_hat = model(x_NA, x_NB)
    share = float((f_NH > 0).float().mean().clamp(1.0 / x_NA.shape[0], 0.5))  # an average latent's firing rate
    res_a, res_b = (x_NA - xa_hat).float(), (x_NB - xb_hat).float()
    err_N = res_a.pow(2).sum(1) + res_b.pow(2).sum(1)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.multinomial(err_N.pow(2).double().cpu() + 1e-30, len(dead), replacement=True, generator=gen)
    rows = rows.to(res_a.device)
    direction = torch.cat([res_a[rows], res_b[rows]], 1)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d_a = x_NA.shape[1]
    dec_norm = torch.cat([model.W_dec_A, model.W_dec_B], 1)[live].norm(dim=1).mean()
    enc_norm = torch.cat([model.W_enc_A, model.W_enc_B], 0)[:, live].norm(dim=0).mean()
    new_dec = (direction * dec_norm * model.resample_dec_scale).to(model.W_dec_A.dtype)
    new_enc = (direction * enc_norm * ENC_SCALE).to(model.W_enc_A.dtype)
    model.W_dec_A[dead] = new_dec[:, :d_a]
    model.W_dec_B[dead] = new_dec[:, d_a:]
    model.W_enc_A[:, dead] = new_enc[:, :d_a].T
    model.W_enc_B[:, dead] = new_enc[:, d_a:].T
    pre_ND = (x_NA.float() @ new_enc[:, :d_a].T.float() + x_NB.float() @ new_enc[:, d_a:].T.float())
    model.b_enc[dead] = -torch.quantile(pre_ND, 1 - share, dim=0).to(model.b_enc.dtype)
    model.post_step()  # a variant re-imposes its constraints (the dedicated-feature masks)
    model.resampled(dead)  # and resets its own per-latent state (BatchTopK's silence counters)
    _reset_moments(model, opt, dead, live)
    return len(dead)


def _reset_moments(model: cc_mod.Crosscoder, opt: torch.optim.Optimizer, dead: torch.Tensor,
                   live: torch.Tensor) -> None:
    """Adam's state of the resampled rows and columns: first moment 0 (stale momentum would push
    them back), second moment the live latents' mean, element by element.

    A zeroed second moment is not a fresh start: Adam's bias correction counts the run's steps, not
    the latent's, so m / sqrt(v) of a consistent gradient then runs at 3-7x the usual step for
    hundreds of steps, and the L1 pull drove half the re-aimed latents of a last block silent again
    within 20 steps (SmolLM2 vs its student: 13% dead at the end; 6.5% with this start, 0.8% with it
    and train.resample_max 0.04)."""
    where = {"W_dec_A": 0, "W_dec_B": 0, "b_enc": 0, "W_enc_A": 1, "W_enc_B": 1}
    live_idx = torch.nonzero(live).flatten()
    for name, dim in where.items():
        state = {k: model.as_named(name, v) for k, v in opt.state.get(model.stored(name), {}).items()
                 if k in ("exp_avg", "exp_avg_sq")}  # in `name`'s layout: latents along `dim`
        if "exp_avg" in state:
            state["exp_avg"].index_fill_(dim, dead, 0.0)
        if "exp_avg_sq" in state:
            v = state["exp_avg_sq"]
            typical = v.index_select(dim, live_idx.to(v.device)).mean(dim, keepdim=True)
            shape = list(v.shape)
            shape[dim] = len(dead)
            v.index_copy_(dim, dead.to(v.device), typical.expand(shape).contiguous())
