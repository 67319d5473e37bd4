"""Decoder-norm metrics of a trained crosscoder, as PAPER.md defines them: relative norms, sharedness and
its permutation null, shared-latent cosines, latent classes and feature strengths (whose
sim_metric is the CCA alignment of similarity.py).

Plain functions on tensors; all arithmetic is float64 on the CPU. Shapes ride on names: N tokens,
H latents, A/B the two models' widths.
"""

from __future__ import annotations

import math

import torch

from .metric_checks import check_decoders, check_mean_act
from .similarity import alignment


# -- relative norms, sharedness, classes ---------------------------------------------------------
def relative_norms(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor) -> torch.Tensor:
    """n_rel(i) = |A_i| / (|A_i| + |B_i|) per latent, float64 [H]; 0.5 where both rows are 0.

    1 means the latent writes only to A, 0 only to B, 0.5 equally to both.
    """
    W_A, W_B = check_decoders(W_dec_HA, W_dec_HB, "relative_norms")
    n_a, n_b = W_A.norm(dim=1), W_B.norm(dim=1)
    total = n_a + n_b
    return torch.where(total > 0, n_a / total.clamp_min(1e-300), torch.full_like(total, 0.5))


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H2(p) = -p log2 p - (1-p) log2(1-p) in bits (0 at p in {0, 1}), float64, elementwise."""
    p = torch.as_tensor(p).detach().cpu().double()
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("binary_entropy: p must lie in [0, 1]")
    q = 1.0 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q)) / math.log(2.0)


def sharedness(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, mean_act_H: torch.Tensor) -> float:
    """PAPER.md sharedness: sum_i a_i H2(n_rel_i) / sum_i a_i (1 = all shared, 0 = all exclusive).

    Latents with a_i == 0 (dead) carry zero weight and so drop out.
    """
    n_rel_H = relative_norms(W_dec_HA, W_dec_HB)
    a_H = check_mean_act(mean_act_H, n_rel_H.shape[0], "sharedness")
    if a_H.sum() <= 0:
        raise ValueError("sharedness: every latent is dead (mean_act_H is all 0); "
                         "need at least one latent with mean activation > 0")
    return float((a_H * binary_entropy(n_rel_H)).sum() / a_H.sum())


def permutation_null_sharedness(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, mean_act_H: torch.Tensor,
                                n_perm: int = 5, seed: int = 0) -> dict:
    """Sharedness after shuffling the live rows of W_dec_B: what latents paired at random score.

    It says how much of a sharedness value the two sides' norm distributions give by themselves
    (equal norms everywhere give 1 even for unrelated latents). Returns dict(mean, std, values).
    """
    if n_perm < 1:
        raise ValueError(f"permutation_null_sharedness: n_perm must be >= 1, got {n_perm}")
    W_A, W_B = check_decoders(W_dec_HA, W_dec_HB, "permutation_null_sharedness")
    a_H = check_mean_act(mean_act_H, W_A.shape[0], "permutation_null_sharedness")
    live = torch.nonzero(a_H > 0).flatten()
    if len(live) == 0:
        raise ValueError("permutation_null_sharedness: every latent is dead (mean_act_H is all 0)")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_perm):
        W_B_perm = W_B.clone()
        W_B_perm[live] = W_B[live[torch.randperm(len(live), generator=gen)]]
        values.append(sharedness(W_A, W_B_perm, a_H))
    v = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(v.mean()), "std": float(v.std()) if n_perm > 1 else 0.0, "values": values}


def shared_cosines(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, low: float = 0.3,
                   high: float = 0.7) -> torch.Tensor:
    """Cosine of each shared latent's (low < n_rel < high) A and B decoder rows, float64.

    Only defined when dA == dB: the two rows then live in comparable coordinates.
    """
    W_A, W_B = check_decoders(W_dec_HA, W_dec_HB, "shared_cosines")
    if W_A.shape[1] != W_B.shape[1]:
        raise ValueError(f"shared_cosines: needs equal widths, got dA={W_A.shape[1]} and "
                         f"dB={W_B.shape[1]}; use alignment for different widths")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"shared_cosines: need 0 <= low < high <= 1, got low={low}, high={high}")
    n_rel_H = relative_norms(W_A, W_B)
    keep_H = (n_rel_H > low) & (n_rel_H < high)
    return torch.nn.functional.cosine_similarity(W_A[keep_H], W_B[keep_H], dim=1)


def latent_classes(n_rel_H: torch.Tensor, mean_act_H: torch.Tensor, a_only: float = 0.9,
                   b_only: float = 0.1, shared: tuple[float, float] = (0.3, 0.7)) -> dict[str, int]:
    """Counts of live latents that are A-only (n_rel > a_only), B-only (n_rel < b_only),
    shared (shared[0] < n_rel < shared[1]) or other, plus dead ones (mean_act == 0)."""
    n_rel = n_rel_H.detach().cpu().double()
    if n_rel.ndim != 1:
        raise ValueError(f"latent_classes: n_rel_H must be 1-D, got shape {tuple(n_rel.shape)}")
    if not 0.0 <= b_only <= shared[0] < shared[1] <= a_only <= 1.0:
        raise ValueError(f"latent_classes: need 0 <= b_only <= shared[0] < shared[1] <= a_only "
                         f"<= 1, got b_only={b_only}, shared={shared}, a_only={a_only}")
    live = check_mean_act(mean_act_H, n_rel.shape[0], "latent_classes") > 0
    a_mask, b_mask = n_rel > a_only, n_rel < b_only
    s_mask = (n_rel > shared[0]) & (n_rel < shared[1])
    counts = {"a_only": int((a_mask & live).sum()), "b_only": int((b_mask & live).sum()),
              "shared": int((s_mask & live).sum()), "dead": int((~live).sum())}
    counts["other"] = int(live.sum()) - counts["a_only"] - counts["b_only"] - counts["shared"]
    return counts


# -- feature strengths (the original feature_strengths.py output) --------------------------------
def feature_strengths(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, mean_act_H: torch.Tensor,
                      live_mask_H: torch.Tensor | None = None) -> dict:
    """data_strength = mean activation, model_strength = n_rel (float64 [H]), sim_metric = alignment.

    The alignment uses live_mask_H, or the latents with mean activation > 0 when it is None.
    """
    n_rel_H = relative_norms(W_dec_HA, W_dec_HB)
    a_H = check_mean_act(mean_act_H, n_rel_H.shape[0], "feature_strengths")
    live = a_H > 0 if live_mask_H is None else live_mask_H
    return {"data_strength": a_H, "model_strength": n_rel_H,
            "sim_metric": alignment(W_dec_HA, W_dec_HB, live).score}
