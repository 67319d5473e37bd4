"""What a crosscoder recovers of a planted pair: the planted truth (sharedness, classes), Hungarian matching
of latents to planted features, classification by relative norm, and a short training loop to fit one.

Shapes ride on names: N tokens, F planted features, H learned latents, A/B the two widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment

from ..crosscoders import crosscoder
from .synthetic import CLASSES, PRED_CLASSES, QUANTILES, SyntheticConfig, SyntheticPair, make_plan


# -- planted truth metrics -----------------------------------------------------------------------
def _relative_norm(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor) -> torch.Tensor:
    """‖W_A[i]‖ / (‖W_A[i]‖ + ‖W_B[i]‖) per row, fp64 (0.5 for rows zero in both)."""
    n_a, n_b = W_dec_HA.detach().double().norm(dim=1), W_dec_HB.detach().double().norm(dim=1)
    total = n_a + n_b
    return torch.where(total > 0, n_a / total.clamp_min(1e-300), torch.full_like(total, 0.5))


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H2(p) in bits, with 0 log 0 = 0."""
    p = p.double()
    q = 1 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q)) / math.log(2)


def _sharedness(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, mean_act_H: torch.Tensor) -> float:
    """PAPER.md sharedness: Σ ā·H2(n_rel) / Σ ā; dead latents (ā = 0) drop out."""
    w_H = mean_act_H.double()
    if w_H.sum() <= 0:
        raise ValueError("sharedness: every latent has zero mean activation")
    h_H = _binary_entropy(_relative_norm(W_dec_HA, W_dec_HB))
    return float((w_H * h_H).sum() / w_H.sum())


@dataclass
class PlantedTruth:
    """What the planted dictionary says the metrics should read."""

    n_rel_F: torch.Tensor
    """Planted relative norm per feature (after any per-model norm scaling)."""
    mean_act_F: torch.Tensor
    """Planted mean activation: marginal firing probability x mean magnitude."""
    sharedness: float
    """PAPER.md sharedness of the planted dictionary."""


def planted_truth(cfg: SyntheticConfig, norm_scales: tuple[float, float] = (1.0, 1.0)) -> PlantedTruth:
    """Planted relative norms, mean activations and sharedness for cfg's dictionary.

    norm_scales multiplies each model's planted decoder rows as the trainer's input scaling
    would (pass norm_factors(pair.x_a, pair.x_b) to compare with a crosscoder from fit_crosscoder).
    """
    plan = make_plan(cfg)
    D_FA, D_FB = plan.D_FA * norm_scales[0], plan.D_FB * norm_scales[1]
    mean_act_F = plan.freq_F.double() * cfg.mag_mean
    return PlantedTruth(n_rel_F=_relative_norm(D_FA, D_FB), mean_act_F=mean_act_F,
                        sharedness=_sharedness(D_FA, D_FB, mean_act_F))


def planted_sharedness(cfg: SyntheticConfig, norm_scales: tuple[float, float] = (1.0, 1.0)) -> float:
    """The sharedness the planted dictionary itself has (the x-axis of a calibration curve)."""
    return planted_truth(cfg, norm_scales).sharedness


# -- matching learned latents to planted features ------------------------------------------------
@dataclass
class MatchResult:
    """Hungarian matching of learned latents to planted features, kept where cosine >= min_cos."""

    latent_idx_M: torch.Tensor
    feature_idx_M: torch.Tensor
    cos_M: torch.Tensor
    """Similarity of each kept pair (mean of per-model cosines, see match_latents)."""
    feature_to_latent_F: torch.Tensor
    """Matched latent per planted feature, -1 when unmatched or below min_cos."""
    recovered_frac: float
    """Fraction of planted features with a kept match."""


def _cosines(W_HD: torch.Tensor, D_FD: torch.Tensor) -> torch.Tensor:
    """Cosine between every learned row and every planted row [H, F]; zero rows give 0."""
    W, D = W_HD.detach().double(), D_FD.detach().double()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    D = D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return W @ D.T


def match_latents(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, D_FA: torch.Tensor,
                  D_FB: torch.Tensor, min_cos: float = 0.5) -> MatchResult:
    """Match latents to planted features one-to-one, maximising decoder similarity.

    Similarity of latent h and feature f: the mean of cos(W_dec_A[h], D_A[f]) and
    cos(W_dec_B[h], D_B[f]) over the models in which f exists (so an A-only feature is
    matched on its A direction alone). Pairs below min_cos do not count as recovered.
    """
    if W_dec_HA.shape[1] != D_FA.shape[1] or W_dec_HB.shape[1] != D_FB.shape[1]:
        raise ValueError(f"match_latents: learned widths {W_dec_HA.shape[1]}/{W_dec_HB.shape[1]} "
                         f"differ from planted {D_FA.shape[1]}/{D_FB.shape[1]}")
    in_a_F, in_b_F = (D_FA.norm(dim=1) > 0).double(), (D_FB.norm(dim=1) > 0).double()
    sim_HF = (_cosines(W_dec_HA, D_FA) * in_a_F + _cosines(W_dec_HB, D_FB) * in_b_F)
    sim_HF = sim_HF / (in_a_F + in_b_F).clamp_min(1.0)
    rows, cols = linear_sum_assignment(sim_HF.numpy(), maximize=True)
    rows, cols = torch.from_numpy(rows), torch.from_numpy(cols)
    cos = sim_HF[rows, cols]
    keep = cos >= min_cos
    feature_to_latent_F = torch.full((D_FA.shape[0],), -1, dtype=torch.long)
    feature_to_latent_F[cols[keep]] = rows[keep]
    return MatchResult(latent_idx_M=rows[keep], feature_idx_M=cols[keep], cos_M=cos[keep],
                       feature_to_latent_F=feature_to_latent_F,
                       recovered_frac=float(keep.sum()) / D_FA.shape[0])


# -- classification by relative norm -------------------------------------------------------------
def predict_class(n_rel_H: torch.Tensor, a_thr: float = 0.9, b_thr: float = 0.1,
                  shared: tuple[float, float] = (0.3, 0.7)) -> list[str]:
    """Label each latent a_only (n_rel >= a_thr), b_only (<= b_thr), shared (inside the band) or 'none'."""
    if not 0.0 <= b_thr <= shared[0] < shared[1] <= a_thr <= 1.0:
        raise ValueError(f"thresholds b_thr={b_thr}, shared={shared}, a_thr={a_thr} must satisfy "
                         "0 <= b_thr <= shared[0] < shared[1] <= a_thr <= 1")
    out = []
    for r in n_rel_H.tolist():
        out.append("a_only" if r >= a_thr else "b_only" if r <= b_thr
                   else "shared" if shared[0] < r < shared[1] else "none")
    return out


def _calibration_row(n_rel: torch.Tensor, preds: list[str]) -> dict[str, float]:
    """Distribution of n_rel over one true class's matched latents and where they land."""
    if len(n_rel) == 0:
        return {"n": 0}
    q = torch.quantile(n_rel.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    row = {"n": len(n_rel), "mean": float(n_rel.double().mean()),
           "std": float(n_rel.double().std(unbiased=False))}
    row.update({f"q{int(p * 100):02d}": float(v) for p, v in zip(QUANTILES, q)})
    row.update({f"frac_pred_{c}": preds.count(c) / len(preds) for c in (*PRED_CLASSES, "none")})
    return row


def classification_report(n_rel_H: torch.Tensor, matches: MatchResult, truth_classes: Sequence[str],
                          a_thr: float = 0.9, b_thr: float = 0.1,
                          shared: tuple[float, float] = (0.3, 0.7),
                          analogous_as: str | None = "shared") -> dict:
    """Precision/recall of A-only, B-only and shared calls by relative norm, over matched latents.

    Truth of a matched latent = its planted feature's class; analogous features count as
    `analogous_as` (default 'shared': present in both models) or are left out when None.
    'recall_planted' divides by every planted feature of the class, matched or not. The
    calibration table gives, per true class (analogous included), n_rel's mean, std and
    quantiles over matched latents and the fraction predicted as each class.
    """
    if analogous_as not in (None, *PRED_CLASSES):
        raise ValueError(f"analogous_as: {analogous_as!r}; accepted: None, {', '.join(PRED_CLASSES)}")
    lat, feat = matches.latent_idx_M, matches.feature_idx_M
    n_rel_M = n_rel_H[lat].double()
    pred_M = predict_class(n_rel_M, a_thr, b_thr, shared)
    raw_M = [truth_classes[i] for i in feat.tolist()]
    remap = {c: c for c in PRED_CLASSES} | {"analogous": analogous_as}
    true_M = [remap[c] for c in raw_M]
    all_true = [remap[c] for c in truth_classes]
    per_class = {}
    for c in PRED_CLASSES:
        tp = sum(t == c and p == c for t, p in zip(true_M, pred_M))
        n_pred = sum(p == c and t is not None for t, p in zip(true_M, pred_M))
        n_true, n_planted = true_M.count(c), all_true.count(c)
        per_class[c] = {"precision": tp / n_pred if n_pred else float("nan"),
                        "recall": tp / n_true if n_true else float("nan"),
                        "recall_planted": tp / n_planted if n_planted else float("nan"),
                        "tp": tp, "n_pred": n_pred, "n_true": n_true, "n_planted": n_planted}
    calibration = {}
    for c in CLASSES:
        idx = [m for m, t in enumerate(raw_M) if t == c]
        calibration[c] = _calibration_row(n_rel_M[idx], [pred_M[m] for m in idx])
    return {"n_matched": len(lat), "recovered_frac": matches.recovered_frac,
            "thresholds": {"a_thr": a_thr, "b_thr": b_thr, "shared": list(shared)},
            "per_class": per_class, "calibration": calibration}


# -- a short training loop for the benchmark ------------------------------------------------------
def norm_factors(x_NA: torch.Tensor, x_NB: torch.Tensor) -> tuple[float, float]:
    """Per-model scale making the mean activation norm sqrt(d) (PAPER.md), from these tokens."""
    return (math.sqrt(x_NA.shape[1]) / float(x_NA.norm(dim=1).mean()),
            math.sqrt(x_NB.shape[1]) / float(x_NB.norm(dim=1).mean()))


def fit_crosscoder(pair: SyntheticPair, cc_cfg: crosscoder.CrosscoderConfig, steps: int = 500,
                   batch_size: int = 256, lr: float = 1e-3, l1_coeff: float = 1.0,
                   seed: int = 0) -> crosscoder.Crosscoder:
    """Train any registered crosscoder on a synthetic pair with a short, deterministic Adam loop.

    Inputs are scaled by norm_factors(pair.x_a, pair.x_b); the L1 coefficient warms up
    linearly over the first 5% of steps. The real trainer lives in train.py.
    """
    if (cc_cfg.d_a, cc_cfg.d_b) != (pair.x_a.shape[1], pair.x_b.shape[1]):
        raise ValueError(f"fit_crosscoder: crosscoder widths {cc_cfg.d_a}/{cc_cfg.d_b} differ "
                         f"from the pair's {pair.x_a.shape[1]}/{pair.x_b.shape[1]}")
    s_a, s_b = norm_factors(pair.x_a, pair.x_b)
    x_NA, x_NB = pair.x_a * s_a, pair.x_b * s_b
    model = crosscoder.build(cc_cfg, seed).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    for step in range(steps):
        idx = torch.randint(0, x_NA.shape[0], (batch_size,), generator=gen)
        parts = model.loss(x_NA[idx], x_NB[idx], l1_coeff * min(1.0, (step + 1) / warmup))
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def latent_mean_acts(model: crosscoder.Crosscoder, pair: SyntheticPair,
                     batch_size: int = 4096) -> torch.Tensor:
    """Mean activation of every latent [H] over the pair's tokens, scaled as fit_crosscoder scales."""
    s_a, s_b = norm_factors(pair.x_a, pair.x_b)
    total_H = torch.zeros(model.cfg.dict_size, dtype=torch.float64)
    for start in range(0, pair.x_a.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        total_H += model.encode(pair.x_a[sl] * s_a, pair.x_b[sl] * s_b).double().sum(0)
    return total_H / pair.x_a.shape[0]


def measured_sharedness(model: crosscoder.Crosscoder, pair: SyntheticPair) -> float:
    """Sharedness of a trained crosscoder, with mean activations measured on `pair`."""
    with torch.no_grad():
        return _sharedness(model.W_dec_A, model.W_dec_B, latent_mean_acts(model, pair))
