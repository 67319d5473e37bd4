"""Null baselines of the decoder metrics and seed-to-seed agreement: what alignment reads on unpaired rows,
Gaussian decoders or a second training seed, and whether two measurements differ beyond their seed spread.

Shapes ride on names: H latents, A/B the two models' widths.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment

from ..analysis import metrics
from ..crosscoders import crosscoder

MATCH_MIN_COS = 0.7
"""Cosine above which two latents of different runs count as the same latent (Paulo & Belrose 2025)."""


def alignment_or_nan(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor,
                      live_H: torch.Tensor | None = None) -> float:
    """metrics.alignment, or NaN when there are too few rows (<= dA + dB) for CCA to mean anything."""
    n = int(live_H.sum()) if live_H is not None else W_dec_HA.shape[0]
    if n <= W_dec_HA.shape[1] + W_dec_HB.shape[1]:
        return float("nan")
    return metrics.alignment(W_dec_HA, W_dec_HB, live_H).score


def null_baselines(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, live_mask: torch.Tensor | None = None,
                   n_perm: int = 20, n_sim: int = 5, seed: int = 0) -> dict:
    """Alignment of two decoders beside what it reads when the rows carry no pairing.

    permutation: W_dec_B's live rows shuffled (metrics.permutation_null_alignment), keeping
    each decoder's own geometry. gaussian_closed_form: E[alignment] of independent Gaussian
    decoders of the same shape, max(dA, dB) / (n_live - 1).
    gaussian_simulated: n_sim draws of such decoders through the same CCA (same ridge).
    excess = alignment - permutation mean; z = excess / permutation std. The permutation null
    is what unpaired rows read, not a floor: decoders whose rows avoid each other (every latent
    in one model only) read below it. With n_live <= dA + dB CCA is trivially near 1, so every
    number is NaN (None in JSON) and only the counts are filled in.
    """
    d_a, d_b = W_dec_HA.shape[1], W_dec_HB.shape[1]
    n_live = W_dec_HA.shape[0] if live_mask is None else int(live_mask.sum())
    if n_live <= d_a + d_b:
        nan = float("nan")
        return {"alignment": nan, "n_live": n_live, "n_total": W_dec_HA.shape[0], "reg": nan,
                "permutation": {"mean": nan, "std": nan, "values": []}, "gaussian_closed_form": nan,
                "gaussian_simulated": None, "excess": nan, "z": nan}
    result = metrics.alignment(W_dec_HA, W_dec_HB, live_mask)
    perm = metrics.permutation_null_alignment(W_dec_HA, W_dec_HB, n_perm=n_perm, seed=seed,
                                              live_mask_H=live_mask, reg=result.reg)
    n = result.n_live
    closed = metrics.alignment_null_gaussian(n, d_a, d_b)
    gen = torch.Generator().manual_seed(seed)
    sims = [metrics.alignment(torch.randn(n, d_a, generator=gen, dtype=torch.float64),
                              torch.randn(n, d_b, generator=gen, dtype=torch.float64),
                              reg=result.reg).score for _ in range(n_sim)]
    excess = result.score - perm["mean"]
    return {"alignment": result.score, "n_live": n, "n_total": result.n_total, "reg": result.reg,
            "permutation": perm, "gaussian_closed_form": closed,
            "gaussian_simulated": seed_spread(sims) | {"values": sims} if sims else None,
            "excess": excess, "z": excess / perm["std"] if perm["std"] > 0 else float("nan")}


def _live_rows(W_HD: torch.Tensor, live_H: torch.Tensor | None) -> torch.Tensor:
    W = W_HD.detach().cpu().double()
    return W if live_H is None else W[live_H.cpu()]


def cross_seed_alignment(model_1: crosscoder.Crosscoder, model_2: crosscoder.Crosscoder,
                         live_1: torch.Tensor | None = None, live_2: torch.Tensor | None = None,
                         min_cos: float = MATCH_MIN_COS) -> dict:
    """Alignment of two crosscoders' decoders side by side (A of run 1 vs A of run 2, B vs B).

    Latents of separate runs are not indexed alike, so live latents are first paired by
    Hungarian matching on the cosine of their concatenated decoder rows [W_dec_A | W_dec_B];
    CCA (metrics.alignment) then runs on the matched rows of each side. A model against itself
    gives 1 (to ~1e-4 when metrics' automatic ridge applies). Also returned: the mean matched
    cosine and the fraction of matched pairs above min_cos (Paulo & Belrose 2025's "same
    latent" count). Matching picks correlated rows, so the floor to compare with is two
    untrained crosscoders through this same function, not the permutation null.
    """
    A1, B1 = _live_rows(model_1.W_dec_A, live_1), _live_rows(model_1.W_dec_B, live_1)
    A2, B2 = _live_rows(model_2.W_dec_A, live_2), _live_rows(model_2.W_dec_B, live_2)
    if (A1.shape[1], B1.shape[1]) != (A2.shape[1], B2.shape[1]):
        raise ValueError(f"cross_seed_alignment: widths {A1.shape[1]}/{B1.shape[1]} and "
                         f"{A2.shape[1]}/{B2.shape[1]} differ; both runs must see the same pair")
    U1, U2 = torch.cat([A1, B1], 1), torch.cat([A2, B2], 1)
    U1 = U1 / U1.norm(dim=1, keepdim=True).clamp_min(1e-12)
    U2 = U2 / U2.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos_12 = U1 @ U2.T
    rows, cols = linear_sum_assignment(cos_12.numpy(), maximize=True)
    rows, cols = torch.from_numpy(rows), torch.from_numpy(cols)
    cos_M = cos_12[rows, cols]
    return {"alignment_A": alignment_or_nan(A1[rows], A2[cols]),
            "alignment_B": alignment_or_nan(B1[rows], B2[cols]),
            "n_matched": len(rows), "mean_cos": float(cos_M.mean()),
            "frac_above_min_cos": float((cos_M >= min_cos).double().mean()), "min_cos": min_cos}


def seed_spread(values: Sequence[float]) -> dict:
    """mean, sample std (0 for one value), min, max and n of a metric over seeds."""
    v = [float(x) for x in values]
    if not v or any(not math.isfinite(x) for x in v):
        raise ValueError(f"seed_spread: values {v!r} must be a non-empty list of finite numbers")
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(v), "max": max(v), "n": len(v)}


def differs(a_stats: dict, b_stats: dict) -> bool:
    """True when two pairs' means differ by more than the larger seed range (max - min) of the two.

    The rule: |mean_a - mean_b| > max(max_a - min_a, max_b - min_b). The range is used rather
    than the std because it needs no distributional assumption with 2-5 seeds and is the
    more cautious of the two. Each side needs at least 2 seeds, else there is no spread.
    """
    for name, s in (("a_stats", a_stats), ("b_stats", b_stats)):
        if s.get("n", 0) < 2:
            raise ValueError(f"differs: {name} has n={s.get('n')!r} seeds; need >= 2 to know the spread")
    spread = max(a_stats["max"] - a_stats["min"], b_stats["max"] - b_stats["min"])
    return abs(a_stats["mean"] - b_stats["mean"]) > spread
