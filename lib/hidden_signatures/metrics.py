"""Metrics read off a trained crosscoder, as PAPER.md defines them, plus baselines.

Decoder metrics (relative norm, sharedness, alignment by CCA, shared-latent cosines,
latent classes, feature strengths), their null values (row permutation, the exact
Gaussian expectation), activation-space baselines (linear CKA, SVCCA) and Latent Scaling
(Minder et al. 2025). Plain functions on tensors; all arithmetic is float64 on the CPU
(inputs may live on any device). Shapes ride on names: N tokens, H latents, A/B the two
models' widths, K selected latents.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

AUTO_REG = 1e-4
"""Ridge (as a fraction of the mean variance) that alignment uses when H is not >> dA + dB."""
AUTO_REG_MIN_RATIO = 10
"""alignment regularises automatically when n_live < AUTO_REG_MIN_RATIO * (dA + dB)."""
MOMENT_CHUNK = 8192
"""Rows per chunk when CKA / SVCCA accumulate second moments (bounds float64 copies)."""

Direction = Literal["own", "A", "B"]


# -- validation -------------------------------------------------------------------------------
def _decoder_pair(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, fn: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both decoders as detached float64 [H, d] matrices with the same H, or ValueError."""
    if W_dec_HA.ndim != 2 or W_dec_HB.ndim != 2:
        raise ValueError(f"{fn}: decoders must be 2-D [H, d], got shapes "
                         f"{tuple(W_dec_HA.shape)} and {tuple(W_dec_HB.shape)}")
    if W_dec_HA.shape[0] != W_dec_HB.shape[0]:
        raise ValueError(f"{fn}: decoders have different numbers of latents "
                         f"{W_dec_HA.shape[0]} and {W_dec_HB.shape[0]}; they must match")
    return W_dec_HA.detach().cpu().double(), W_dec_HB.detach().cpu().double()


def _vector(t: torch.Tensor, H: int, fn: str, name: str) -> torch.Tensor:
    """`t` as a detached float64 vector of length H, or ValueError."""
    if t.shape != (H,):
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected ({H},)")
    return t.detach().cpu().double()


def _mask(live_mask_H: torch.Tensor | None, H: int, fn: str) -> torch.Tensor:
    """A boolean live mask of length H (all True when None), or ValueError."""
    if live_mask_H is None:
        return torch.ones(H, dtype=torch.bool)
    if live_mask_H.dtype != torch.bool or live_mask_H.shape != (H,):
        raise ValueError(f"{fn}: live_mask_H must be a bool tensor of shape ({H},), got "
                         f"{live_mask_H.dtype} {tuple(live_mask_H.shape)}")
    return live_mask_H.detach().cpu()


def _mean_act(mean_act_H: torch.Tensor, H: int, fn: str) -> torch.Tensor:
    """Mean activations as float64 [H]; negative or non-finite values are a ValueError."""
    a_H = _vector(mean_act_H, H, fn, "mean_act_H")
    if not torch.isfinite(a_H).all() or (a_H < 0).any():
        raise ValueError(f"{fn}: mean_act_H must be finite and >= 0 (min {a_H.min().item():g})")
    return a_H


def _samples(X: torch.Tensor, name: str, fn: str) -> torch.Tensor:
    """A 2-D [N, d] sample matrix with N >= 2, or ValueError."""
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"{fn}: {name} must be 2-D [N, d] with N >= 2, got {tuple(X.shape)}")
    return X.detach().cpu()


# -- relative norms, sharedness, classes ---------------------------------------------------------
def relative_norms(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor) -> torch.Tensor:
    """n_rel(i) = |A_i| / (|A_i| + |B_i|) per latent, float64 [H]; 0.5 where both rows are 0.

    1 means the latent writes only to A, 0 only to B, 0.5 equally to both.
    """
    W_A, W_B = _decoder_pair(W_dec_HA, W_dec_HB, "relative_norms")
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
    a_H = _mean_act(mean_act_H, n_rel_H.shape[0], "sharedness")
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
    W_A, W_B = _decoder_pair(W_dec_HA, W_dec_HB, "permutation_null_sharedness")
    a_H = _mean_act(mean_act_H, W_A.shape[0], "permutation_null_sharedness")
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
    W_A, W_B = _decoder_pair(W_dec_HA, W_dec_HB, "shared_cosines")
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
    live = _mean_act(mean_act_H, n_rel.shape[0], "latent_classes") > 0
    a_mask, b_mask = n_rel > a_only, n_rel < b_only
    s_mask = (n_rel > shared[0]) & (n_rel < shared[1])
    counts = {"a_only": int((a_mask & live).sum()), "b_only": int((b_mask & live).sum()),
              "shared": int((s_mask & live).sum()), "dead": int((~live).sum())}
    counts["other"] = int(live.sum()) - counts["a_only"] - counts["b_only"] - counts["shared"]
    return counts


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
    W_A, W_B = _decoder_pair(W_dec_HA, W_dec_HB, fn)
    H = W_A.shape[0]
    live = _mask(live_mask_H, H, fn)
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
    X, Y = _samples(X_NA, "X_NA", fn), _samples(Y_NB, "Y_NB", fn)
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
        W_A, W_B = _decoder_pair(W_dec_HA, W_dec_HB, "latent_scaling")
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


# -- feature strengths (the original feature_strengths.py output) --------------------------------
def feature_strengths(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor, mean_act_H: torch.Tensor,
                      live_mask_H: torch.Tensor | None = None) -> dict:
    """data_strength = mean activation, model_strength = n_rel (float64 [H]), sim_metric = alignment.

    The alignment uses live_mask_H, or the latents with mean activation > 0 when it is None.
    """
    n_rel_H = relative_norms(W_dec_HA, W_dec_HB)
    a_H = _mean_act(mean_act_H, n_rel_H.shape[0], "feature_strengths")
    live = a_H > 0 if live_mask_H is None else live_mask_H
    return {"data_strength": a_H, "model_strength": n_rel_H,
            "sim_metric": alignment(W_dec_HA, W_dec_HB, live).score}
