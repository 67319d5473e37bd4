"""Subspace similarity: alignment of the two decoders by CCA with its nulls (row permutation, the exact
Gaussian expectation), and the activation-space baselines linear CKA and SVCCA.

Plain functions on tensors; all arithmetic is float64 on the CPU. Shapes ride on names: N tokens,
H latents, A/B the two models' widths.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .metric_checks import check_decoders, check_mask, check_samples

AUTO_REG = 1e-4
"""Ridge (as a fraction of the mean variance) that alignment uses when H is not >> dA + dB."""
AUTO_REG_MIN_RATIO = 10
"""alignment regularises automatically when n_live < AUTO_REG_MIN_RATIO * (dA + dB)."""
MOMENT_CHUNK = 8192
"""Rows per chunk when CKA / SVCCA accumulate second moments (bounds float64 copies)."""


# -- canonical correlations ----------------------------------------------------------------------
def _whitened_basis(X_NP: torch.Tensor, reg: float, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis U of the centred columns of X and the ridge shrinkage s/sqrt(s^2 + r).

    r = reg * trace(Xc^T Xc) / P. Directions with s <= s_max * rtol are dropped as numerically
    null (rtol from _rank_rtol, i.e. from the input dtype's precision).
    """
    Xc = X_NP - X_NP.mean(dim=0, keepdim=True)
    U, s, _ = torch.linalg.svd(Xc, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return U[:, :0], s[:0]
    keep = s > s[0] * rtol
    r = reg * float((s**2).sum()) / Xc.shape[1]
    return U[:, keep], s[keep] / torch.sqrt(s[keep] ** 2 + r)


def _cross_correlations(Ux: torch.Tensor, wx: torch.Tensor, Uy: torch.Tensor, wy: torch.Tensor
                        ) -> torch.Tensor:
    """Canonical correlations (descending) from two whitened bases: svd(diag wx Ux^T Uy diag wy)."""
    M = (wx[:, None] * (Ux.T @ Uy)) * wy[None, :]
    return torch.linalg.svdvals(M).clamp(0.0, 1.0)


def _rank_rtol(*tensors: torch.Tensor) -> float:
    """Relative singular-value cut for numerical rank: 100 eps of the least precise input,
    at most 1e-3 (so bf16 decoders keep their real directions)."""
    eps = [torch.finfo(t.dtype).eps if t.is_floating_point() else torch.finfo(torch.float32).eps
           for t in tensors]
    return min(100 * max(eps), 1e-3)


@dataclass
class AlignmentResult:
    """Decoder alignment: mean squared canonical correlation and what it was computed on."""

    score: float
    """Mean of spectrum**2 (1 = the decoders are linear images of each other)."""
    spectrum: torch.Tensor
    """Canonical correlations, descending, float64; length min(rank A, rank B)."""
    n_live: int
    """Latents (rows) used as samples."""
    n_total: int
    """Latents in the dictionary."""
    reg: float
    """Ridge used on each covariance, as a fraction of its mean eigenvalue."""


def _resolve_reg(reg: float | None, n: int, d_a: int, d_b: int) -> float:
    """The ridge fraction: `reg` itself, else 0 when n >= AUTO_REG_MIN_RATIO * (dA + dB), else AUTO_REG."""
    if reg is None:
        return 0.0 if n >= AUTO_REG_MIN_RATIO * (d_a + d_b) else AUTO_REG
    if not math.isfinite(reg) or reg < 0:
        raise ValueError(f"alignment: reg must be a finite number >= 0 or None, got {reg!r}")
    return float(reg)


def _alignment_bases(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor,
                     live_mask_H: torch.Tensor | None, reg: float | None, fn: str):
    """Whitened bases of the live decoder rows, the ridge used and the row counts."""
    W_A, W_B = check_decoders(W_dec_HA, W_dec_HB, fn)
    H = W_A.shape[0]
    live = check_mask(live_mask_H, H, fn)
    n_live = int(live.sum())
    if n_live < 2:
        raise ValueError(f"{fn}: needs at least 2 live latents as samples, got {n_live}")
    d_a, d_b = W_A.shape[1], W_B.shape[1]
    if n_live <= d_a + d_b:
        warnings.warn(f"{fn}: only {n_live} live latents for dA + dB = {d_a + d_b} dimensions; "
                      "canonical correlations are then trivially close to 1", stacklevel=3)
    r = _resolve_reg(reg, n_live, d_a, d_b)
    rtol = _rank_rtol(W_dec_HA, W_dec_HB)
    Ux, wx = _whitened_basis(W_A[live], r, rtol)
    Uy, wy = _whitened_basis(W_B[live], r, rtol)
    return Ux, wx, Uy, wy, r, n_live, H


def alignment(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor,
              live_mask_H: torch.Tensor | None = None, reg: float | None = None) -> AlignmentResult:
    """PAPER.md alignment: mean squared canonical correlation of W_dec_A and W_dec_B, latents as samples.

    Each column is centred on its own mean; the covariances get a ridge reg * trace/d * I
    (reg=None: 0 when n_live >= 10 (dA + dB), else 1e-4). Computed from thin SVDs of the
    centred decoders in float64; dA != dB is fine (min(rank A, rank B) correlations).
    Only rows where live_mask_H is True are used.
    """
    Ux, wx, Uy, wy, r, n_live, H = _alignment_bases(W_dec_HA, W_dec_HB, live_mask_H, reg,
                                                    "alignment")
    rho = _cross_correlations(Ux, wx, Uy, wy)
    if rho.numel() == 0:
        raise ValueError("alignment: a decoder has no variance over the live latents")
    return AlignmentResult(score=float((rho**2).mean()), spectrum=rho, n_live=n_live,
                           n_total=H, reg=r)


def permutation_null_alignment(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, n_perm: int = 5,
                               seed: int = 0, live_mask_H: torch.Tensor | None = None,
                               reg: float | None = None) -> dict:
    """Alignment after shuffling the (live) rows of W_dec_B: the score that unpaired latents get.

    Returns dict(mean, std, values); std is the sample std (0 for n_perm == 1).
    """
    if n_perm < 1:
        raise ValueError(f"permutation_null_alignment: n_perm must be >= 1, got {n_perm}")
    Ux, wx, Uy, wy, _, n_live, _ = _alignment_bases(W_dec_HA, W_dec_HB, live_mask_H, reg,
                                                    "permutation_null_alignment")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_perm):
        # Centring and the SVD commute with a row permutation, so permute B's basis rows.
        perm = torch.randperm(n_live, generator=gen)
        values.append(float((_cross_correlations(Ux, wx, Uy[perm], wy) ** 2).mean()))
    v = torch.tensor(values, dtype=torch.float64)
    std = float(v.std()) if n_perm > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "values": values}


def alignment_null_gaussian(H: int, d_a: int, d_b: int) -> float:
    """Expected alignment (reg = 0) of independent Gaussian decoders: max(dA, dB) / (H - 1).

    Derived, not simulated: with p = dA, q = dB, n = H centred samples, Pillai's trace
    V = sum_i rho_i^2 = tr(U), U ~ matrix Beta_p(q/2, (n-1-q)/2) (Jacobi ensemble), so
    E[U] = q/(n-1) I and E[V] = p q / (n-1); divided by min(p, q) correlations this is
    max(p, q)/(n-1). Needs H - 1 >= dA + dB (else correlations are trivially 1).
    """
    if min(d_a, d_b) < 1 or H - 1 < d_a + d_b:
        raise ValueError(f"alignment_null_gaussian: need dA, dB >= 1 and H - 1 >= dA + dB, got "
                         f"H={H}, dA={d_a}, dB={d_b}")
    return max(d_a, d_b) / (H - 1)


# -- activation-space baselines ------------------------------------------------------------------
def _centred_moments(X_NA: torch.Tensor, Y_NB: torch.Tensor, fn: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred second moments Xc^T Xc, Yc^T Yc, Xc^T Yc in float64, accumulated over row chunks."""
    X, Y = check_samples(X_NA, "X_NA", fn), check_samples(Y_NB, "Y_NB", fn)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"{fn}: X and Y need the same number of rows, got {X.shape[0]} and "
                         f"{Y.shape[0]}")
    n, a, b = X.shape[0], X.shape[1], Y.shape[1]
    # Shift by the first row before summing: same centred moments, far less cancellation.
    x0, y0 = X[0].double(), Y[0].double()
    sx, sy = torch.zeros(a, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
    Sxx = torch.zeros(a, a, dtype=torch.float64)
    Syy = torch.zeros(b, b, dtype=torch.float64)
    Sxy = torch.zeros(a, b, dtype=torch.float64)
    for start in range(0, n, MOMENT_CHUNK):
        x = X[start:start + MOMENT_CHUNK].double() - x0
        y = Y[start:start + MOMENT_CHUNK].double() - y0
        sx += x.sum(0)
        sy += y.sum(0)
        Sxx += x.T @ x
        Syy += y.T @ y
        Sxy += x.T @ y
    mx, my = sx / n, sy / n
    return (Sxx - n * torch.outer(mx, mx), Syy - n * torch.outer(my, my),
            Sxy - n * torch.outer(mx, my))


def linear_cka(X_NA: torch.Tensor, Y_NB: torch.Tensor) -> float:
    """Centred linear CKA (Kornblith et al. 2019) between two activation sets on the same N tokens.

    Feature-space form ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), accumulated over
    row chunks, so memory is O(dA dB) whatever N; widths may differ.
    """
    Cxx, Cyy, Cxy = _centred_moments(X_NA, Y_NB, "linear_cka")
    den = torch.linalg.matrix_norm(Cxx) * torch.linalg.matrix_norm(Cyy)
    if den <= 0:
        raise ValueError("linear_cka: X or Y has no variance")
    return float(torch.linalg.matrix_norm(Cxy) ** 2 / den)


def _top_directions(C: torch.Tensor, keep: float | int, fn: str) -> torch.Tensor:
    """Whitening map V_k diag(lambda_k^-1/2) of the top-variance directions SVCCA keeps."""
    lam, V = torch.linalg.eigh(C)
    lam, V = lam.flip(0).clamp_min(0.0), V.flip(1)
    if lam[0] <= 0:
        raise ValueError(f"{fn}: an input has no variance")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"{fn}: keep must be a variance fraction in (0, 1] or a count, got {keep!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= C.shape[0]:
            raise ValueError(f"{fn}: keep={keep} directions is outside [1, {C.shape[0]}]")
        k = keep
    else:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{fn}: keep fraction {keep} is outside (0, 1]")
        frac = lam.cumsum(0) / lam.sum()
        k = int((frac < keep - 1e-12).sum()) + 1
    k = min(k, int((lam > lam[0] * C.shape[0] * torch.finfo(torch.float64).eps).sum()))
    return V[:, :k] / lam[:k].sqrt()


def svcca(X_NA: torch.Tensor, Y_NB: torch.Tensor, keep: float | int = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): mean canonical correlation after reducing each side by SVD.

    keep: a float keeps the fewest top directions explaining that fraction of the variance,
    an int keeps that many. CCA then runs on the reduced data; the mean is over
    min(kA, kB) correlations. Built from chunked centred moments, so N may be large.
    """
    Cxx, Cyy, Cxy = _centred_moments(X_NA, Y_NB, "svcca")
    Wx, Wy = _top_directions(Cxx, keep, "svcca"), _top_directions(Cyy, keep, "svcca")
    rho = torch.linalg.svdvals(Wx.T @ Cxy @ Wy).clamp(0.0, 1.0)
    return float(rho.mean())
