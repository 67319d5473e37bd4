"""Tests for hidden_signatures.analysis.metrics: known answers and independent cross-checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cross_decomposition import CCA

from hidden_signatures.analysis import metrics as M
from hidden_signatures.analysis import similarity

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(randn(d, d, seed=seed))
    return Q


# -- relative norms, entropy, sharedness, classes -------------------------------------------------
def test_relative_norms_hand_built():
    W_A = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    W_B = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    n_rel = M.relative_norms(W_A, W_B)
    assert n_rel.dtype == F64
    torch.testing.assert_close(n_rel, torch.tensor([1.0, 0.0, 0.5, 0.5, 0.75], dtype=F64))


def test_binary_entropy_known_values():
    p = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.75])
    expected = torch.tensor([0.0, 0.0, 1.0, 0.8112781244591328, 0.8112781244591328], dtype=F64)
    torch.testing.assert_close(M.binary_entropy(p), expected)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.binary_entropy(torch.tensor([1.5]))


def test_sharedness_identical_decoders_is_one():
    W = randn(50, 8)
    assert M.sharedness(W, W.clone(), torch.rand(50, generator=gen(1)) + 0.1) == pytest.approx(1.0)


def test_sharedness_one_sided_is_zero():
    W = randn(20, 8)
    a = torch.ones(20)
    assert M.sharedness(W, torch.zeros(20, 6), a) == 0.0
    assert M.sharedness(torch.zeros(20, 8), randn(20, 6), a) == 0.0


def test_sharedness_weights_and_dead_latents_drop_out():
    # latent 0: shared (H2 = 1, weight 3); latent 1: n_rel = 0.25 (weight 1); latent 2: dead.
    W_A = torch.tensor([[1.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    W_B = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 0.0]])
    a = torch.tensor([3.0, 1.0, 0.0])
    expected = (3 * 1.0 + 1 * 0.8112781244591328) / 4
    assert M.sharedness(W_A, W_B, a) == pytest.approx(expected, abs=1e-12)
    W_B_dead_changed = W_B.clone()
    W_B_dead_changed[2] = torch.tensor([5.0, 0.0])  # the dead latent becomes shared: no effect
    assert M.sharedness(W_A, W_B_dead_changed, a) == pytest.approx(expected, abs=1e-12)


def test_sharedness_errors():
    W = randn(4, 3)
    with pytest.raises(ValueError, match="every latent is dead"):
        M.sharedness(W, W, torch.zeros(4))
    with pytest.raises(ValueError, match=">= 0"):
        M.sharedness(W, W, torch.tensor([1.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="different numbers of latents"):
        M.sharedness(W, randn(5, 3), torch.ones(4))
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        M.sharedness(W, W, torch.ones(5))


def test_latent_classes_hand_built():
    n_rel = torch.tensor([0.95, 0.05, 0.5, 0.2, 0.8, 0.5, 1.0, 0.0])
    mean_act = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.0])
    counts = M.latent_classes(n_rel, mean_act)
    assert counts == {"a_only": 2, "b_only": 1, "shared": 1, "other": 2, "dead": 2}
    assert sum(counts.values()) == n_rel.numel()
    with pytest.raises(ValueError, match="b_only <= shared"):
        M.latent_classes(n_rel, mean_act, a_only=0.6)


def test_shared_cosines_hand_built():
    W_A = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    W_B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.01], [-2.0, 0.0]])
    cos = M.shared_cosines(W_A, W_B)  # latent 2 has n_rel ~ 0.99: not shared
    torch.testing.assert_close(cos, torch.tensor([1.0, 0.0, -1.0], dtype=F64))
    with pytest.raises(ValueError, match="equal widths"):
        M.shared_cosines(randn(4, 3), randn(4, 5))


# -- alignment ---------------------------------------------------------------------------------------
def test_alignment_identical_rotated_and_scaled():
    W = randn(2000, 12)
    res = M.alignment(W, W.clone())
    assert res.reg == 0.0  # H >= 10 (dA + dB): no ridge
    assert res.score == pytest.approx(1.0, abs=1e-9)
    assert res.spectrum.shape == (12,) and (res.n_live, res.n_total) == (2000, 2000)
    assert M.alignment(W, 3.0 * W @ orthogonal(12, seed=1)).score == pytest.approx(1.0, abs=1e-9)


def test_alignment_identical_with_automatic_ridge():
    W = randn(100, 12)  # H < 10 (dA + dB): the small automatic ridge applies
    res = M.alignment(W, W.clone())
    assert res.reg == M.AUTO_REG
    assert 0.999 < res.score < 1.0


def test_alignment_different_width_injective_map():
    W_A = randn(1500, 10)
    W_B = W_A @ randn(10, 16, seed=2)  # rank 10 inside 16 dims
    res = M.alignment(W_A, W_B.float())  # float32 input: rank cut at float32 precision
    assert res.spectrum.shape == (10,)
    assert res.score == pytest.approx(1.0, abs=1e-6)


def test_alignment_independent_gaussian_near_null():
    H, p, q = 4000, 10, 14
    score = M.alignment(randn(H, p, seed=3), randn(H, q, seed=4)).score
    null = M.alignment_null_gaussian(H, p, q)
    assert null == pytest.approx(q / (H - 1))
    # (n-1) * Pillai's trace ~ chi2 with pq dof, so the score has std sqrt(2pq)/((n-1) min(p,q)).
    std = math.sqrt(2 * p * q) / ((H - 1) * min(p, q))
    assert abs(score - null) < 5 * std


def test_alignment_null_gaussian_matches_simulation():
    n, p, q, reps = 120, 3, 5, 200
    g = gen(5)
    scores = [M.alignment(torch.randn(n, p, generator=g, dtype=F64),
                          torch.randn(n, q, generator=g, dtype=F64), reg=0.0).score
              for _ in range(reps)]
    std_err = np.std(scores) / math.sqrt(reps)
    assert abs(np.mean(scores) - M.alignment_null_gaussian(n, p, q)) < 4 * std_err
    with pytest.raises(ValueError, match="H - 1 >= dA \\+ dB"):
        M.alignment_null_gaussian(10, 5, 5)


@pytest.mark.parametrize("p,q,seed", [(3, 4, 0), (4, 2, 1), (3, 3, 2)])
def test_alignment_agrees_with_sklearn_cca(p, q, seed):
    X = randn(80, p, seed=seed) + 3.0 * torch.arange(p)  # column offsets: per-column centring
    Y = X[:, :1] @ randn(1, q, seed=seed + 10) + X[:, -1:] * 0.5 + randn(80, q, seed=seed + 20)
    res = M.alignment(X, Y, reg=0.0)
    k = min(p, q)
    cca = CCA(n_components=k, scale=False, max_iter=100_000, tol=1e-14).fit(X.numpy(), Y.numpy())
    xs, ys = cca.transform(X.numpy(), Y.numpy())
    ref = sorted((abs(np.corrcoef(xs[:, i], ys[:, i])[0, 1]) for i in range(k)), reverse=True)
    np.testing.assert_allclose(res.spectrum.numpy(), ref, atol=1e-4)
    assert res.score == pytest.approx(float(np.mean(np.square(ref))), abs=1e-4)


def test_alignment_live_mask_uses_only_live_rows():
    H, n_live = 600, 400
    W_A = randn(H, 8, seed=6)
    W_B = W_A.clone()
    W_B[n_live:] = 10 * randn(H - n_live, 8, seed=7)  # dead rows: independent, large
    live = torch.arange(H) < n_live
    assert M.alignment(W_A, W_B).score < 0.5
    res = M.alignment(W_A, W_B, live)
    assert res.score == pytest.approx(1.0, abs=1e-9)
    assert (res.n_live, res.n_total) == (n_live, H)
    W_B[n_live:] = randn(H - n_live, 8, seed=8)  # the dead rows' values must not matter
    assert M.alignment(W_A, W_B, live).score == res.score


def test_alignment_errors():
    W = randn(10, 3)
    with pytest.raises(ValueError, match="bool tensor"):
        M.alignment(W, W, torch.ones(10))
    with pytest.raises(ValueError, match="at least 2 live"):
        M.alignment(W, W, torch.arange(10) == 0)
    with pytest.raises(ValueError, match="reg must be"):
        M.alignment(W, W, reg=-1.0)


def test_permutation_null_of_identical_decoders_is_far_below_one():
    W = randn(2000, 16, seed=9)
    assert M.alignment(W, W).score == pytest.approx(1.0)
    null = M.permutation_null_alignment(W, W, n_perm=4, seed=0)
    assert len(null["values"]) == 4 and null["std"] > 0
    assert null["mean"] < 5 * M.alignment_null_gaussian(2000, 16, 16)  # ~0.008 expected
    assert M.permutation_null_alignment(W, W, n_perm=4, seed=0) == null  # seeded
    assert M.permutation_null_alignment(W, W, n_perm=4, seed=1)["values"] != null["values"]


def test_permutation_null_sharedness_separates_paired_norms_from_random_pairing():
    gen = torch.Generator().manual_seed(3)
    scale = torch.exp(2.0 * torch.randn(500, 1, generator=gen, dtype=F64))  # row norms over ~3 decades
    W = randn(500, 8, seed=4) * scale
    act = torch.rand(500, generator=gen, dtype=F64)
    assert M.sharedness(W, W, act) == pytest.approx(1.0)
    null = M.permutation_null_sharedness(W, W, act, n_perm=4, seed=0)
    assert null["mean"] < 0.6 and null["std"] > 0  # random pairing of unequal norms is exclusive-looking
    assert M.permutation_null_sharedness(W, W, act, n_perm=4, seed=0) == null
    # Equal norms everywhere: sharedness is 1 whatever the pairing, and the null says so.
    U = W / W.norm(dim=1, keepdim=True)
    assert M.permutation_null_sharedness(U, U, act, n_perm=2)["mean"] == pytest.approx(1.0)


def test_permutation_null_sharedness_moves_only_live_rows():
    W = randn(50, 4, seed=5)
    act = torch.zeros(50, dtype=F64)
    act[:2] = 1.0
    W_B = W.clone()
    W_B[2:] = 0.0  # dead latents: rows that would change the score if they were shuffled in
    null = M.permutation_null_sharedness(W, W_B, act, n_perm=3)
    assert all(v > 0.0 for v in null["values"])  # a live latent never draws a dead latent's zero row
    with pytest.raises(ValueError, match="every latent is dead"):
        M.permutation_null_sharedness(W, W, torch.zeros(50, dtype=F64))
    with pytest.raises(ValueError, match="n_perm"):
        M.permutation_null_sharedness(W, W, act, n_perm=0)


# -- CKA and SVCCA ---------------------------------------------------------------------------------
def gram_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Reference CKA from centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = X.shape[0]
    Hc = torch.eye(n, dtype=F64) - 1.0 / n
    K, L = Hc @ (X @ X.T) @ Hc, Hc @ (Y @ Y.T) @ Hc
    hsic = lambda A, B: (A * B).sum()  # noqa: E731  (tr(A B) for symmetric A, B)
    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


def test_linear_cka_known_answers_and_gram_crosscheck():
    X = randn(300, 12, seed=10) + 1.0
    assert M.linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert M.linear_cka(X, 2.5 * X @ orthogonal(12, seed=11)) == pytest.approx(1.0, abs=1e-12)
    Y = X[:, :5] @ randn(5, 7, seed=12) + randn(300, 7, seed=13)  # different width
    cka = M.linear_cka(X, Y)
    assert 0.05 < cka < 0.95
    assert cka == pytest.approx(gram_cka(X, Y), abs=1e-10)
    assert M.linear_cka(X.float(), Y.float()) == pytest.approx(cka, abs=1e-5)


def test_linear_cka_chunked_moments_match_single_pass(monkeypatch):
    X, Y = randn(500, 6, seed=14) + 50.0, randn(500, 4, seed=15)
    whole = M.linear_cka(X, Y)
    monkeypatch.setattr(similarity, "MOMENT_CHUNK", 37)
    assert M.linear_cka(X, Y) == pytest.approx(whole, abs=1e-12)
    assert whole == pytest.approx(gram_cka(X, Y), abs=1e-10)


def test_svcca_identical_rotation_and_full_rank_crosscheck():
    X = randn(400, 10, seed=16)
    assert M.svcca(X, X) == pytest.approx(1.0, abs=1e-9)
    assert M.svcca(X, X @ orthogonal(10, seed=17), keep=0.99) == pytest.approx(1.0, abs=1e-9)
    assert M.svcca(X, 3 * X @ orthogonal(10, seed=17), keep=4) == pytest.approx(1.0, abs=1e-9)
    Y = X[:, :3] + randn(400, 6, seed=18)[:, :3]
    # Keeping every direction, SVCCA is plain CCA: the mean of alignment's spectrum (reg = 0).
    full = M.alignment(X, Y, reg=0.0).spectrum.mean()
    assert M.svcca(X, Y, keep=1.0) == pytest.approx(float(full), abs=1e-9)


def test_svcca_keep_fraction_drops_low_variance_noise():
    Z = randn(2000, 3, seed=19)
    X = torch.cat([10 * Z, 0.01 * randn(2000, 3, seed=20)], dim=1)
    Y = torch.cat([10 * Z @ orthogonal(3, seed=21), 0.01 * randn(2000, 3, seed=22)], dim=1)
    assert M.svcca(X, Y, keep=0.99) == pytest.approx(1.0, abs=1e-6)
    assert M.svcca(X, Y, keep=6) < 0.6  # the noise directions are independent
    with pytest.raises(ValueError, match="outside"):
        M.svcca(X, Y, keep=1.5)
    with pytest.raises(ValueError, match="outside"):
        M.svcca(X, Y, keep=7)


# -- latent scaling ----------------------------------------------------------------------------------
def one_hot_latents(N: int, H: int, seed: int) -> torch.Tensor:
    """Each token fires exactly one latent with a positive magnitude."""
    g = gen(seed)
    idx = torch.randint(H, (N,), generator=g)
    f = torch.zeros(N, H, dtype=F64)
    f[torch.arange(N), idx] = torch.randn(N, generator=g, dtype=F64).exp()
    return f


def test_latent_scaling_recovers_planted_scale():
    N, H, dA, dB = 3000, 6, 10, 8
    f = one_hot_latents(N, H, seed=23)
    W_A, W_B = randn(H, dA, seed=24), randn(H, dB, seed=25)
    c_B = torch.tensor([0.3, 1.0, 0.0, 0.5, 2.0, 1.0], dtype=F64)
    x_A = f @ W_A + 0.05 * randn(N, dA, seed=26)
    x_B = (f * c_B) @ W_B + 0.05 * randn(N, dB, seed=27)
    out = M.latent_scaling(f, W_A, W_B, x_A, x_B, chunk_size=256)
    torch.testing.assert_close(out["beta_B"], c_B, atol=0.01, rtol=0)
    torch.testing.assert_close(out["beta_A"], torch.ones(H, dtype=F64), atol=0.01, rtol=0)
    assert int(out["count_active"].sum()) == N


def brute_force_beta(f_N: torch.Tensor, v: torch.Tensor, y_ND: torch.Tensor) -> float:
    """Least squares of vec(y) on vec(f v^T) with torch.linalg.lstsq."""
    design = (f_N[:, None] * v[None, :]).reshape(-1, 1)
    return float(torch.linalg.lstsq(design, y_ND.reshape(-1, 1)).solution)


@pytest.mark.parametrize("direction", ["own", "B"])
def test_latent_scaling_targets_match_brute_force(direction):
    N, H, d = 400, 5, 6
    g = gen(28)
    f = torch.relu(torch.randn(N, H, generator=g, dtype=F64) - 0.5)  # co-firing latents
    W_A, W_B = randn(H, d, seed=29), randn(H, d, seed=30)
    x_A, x_B = randn(N, d, seed=31) + f @ W_A, randn(N, d, seed=32) + 0.4 * f @ W_B
    r_A, r_B = f @ W_A + 0.1, f @ (1.2 * W_B) - 0.2  # stand-in reconstructions
    latents = torch.tensor([4, 0, 2])
    out = M.latent_scaling(f, W_A, W_B, x_A, x_B, r_A, r_B, latents=latents,
                           direction=direction, chunk_size=33)
    for k, i in enumerate(latents.tolist()):
        fi = f[:, i]
        for side, W, x, r in (("A", W_A, x_A, r_A), ("B", W_B, x_B, r_B)):
            v = W[i] if direction == "own" else W_B[i]
            assert out[f"beta_{side}"][k] == pytest.approx(brute_force_beta(fi, v, x), abs=1e-10)
            assert out[f"beta_recon_{side}"][k] == pytest.approx(brute_force_beta(fi, v, r),
                                                                 abs=1e-10)
            err = x - r + fi[:, None] * W[i][None, :]  # removal uses the model's own row
            assert out[f"beta_error_{side}"][k] == pytest.approx(brute_force_beta(fi, v, err),
                                                                 abs=1e-10)
    torch.testing.assert_close(out["nu_error"], out["beta_error_A"] / out["beta_error_B"])
    torch.testing.assert_close(out["nu_recon"], out["beta_recon_A"] / out["beta_recon_B"])
    whole = M.latent_scaling(f, W_A, W_B, x_A, x_B, r_A, r_B, latents=latents,
                             direction=direction, chunk_size=N)
    for key in out:
        torch.testing.assert_close(out[key], whole[key])


def test_latent_scaling_silent_latents_and_errors():
    N, H = 50, 3
    f = one_hot_latents(N, H, seed=33)
    f[:, 1] = 0.0
    W_A, W_B = randn(H, 4, seed=34), randn(H, 5, seed=35)
    x_A, x_B = randn(N, 4, seed=36), randn(N, 5, seed=37)
    out = M.latent_scaling(f, W_A, W_B, x_A, x_B)
    assert torch.isnan(out["beta_A"][1]) and torch.isfinite(out["beta_A"][[0, 2]]).all()
    assert "beta_error_A" not in out and "nu_error" not in out
    with pytest.raises(ValueError, match="needs dA == dB"):
        M.latent_scaling(f, W_A, W_B, x_A, x_B, direction="A")
    with pytest.raises(ValueError, match="not 'own'"):
        M.latent_scaling(f, W_A, W_A, x_A, x_A, direction="C")
    with pytest.raises(ValueError, match="expected"):
        M.latent_scaling(f, W_A, W_B, x_B, x_A)
    acc = M.LatentScalingAccumulator(W_A, W_B)
    acc.update(f[:10], x_A[:10], x_B[:10], recon_NA=x_A[:10])
    with pytest.raises(ValueError, match="some chunks but not others"):
        acc.update(f[10:], x_A[10:], x_B[10:])


# -- feature strengths -------------------------------------------------------------------------------
def test_feature_strengths_mirrors_original_output():
    H = 300
    W_A = randn(H, 6, seed=38)
    W_B = W_A @ randn(6, 5, seed=39) + 0.1 * randn(H, 5, seed=40)
    mean_act = torch.rand(H, generator=gen(41), dtype=F64)
    mean_act[:50] = 0.0
    out = M.feature_strengths(W_A, W_B, mean_act)
    assert set(out) == {"data_strength", "model_strength", "sim_metric"}
    torch.testing.assert_close(out["data_strength"], mean_act)
    torch.testing.assert_close(out["model_strength"], M.relative_norms(W_A, W_B))
    assert out["sim_metric"] == M.alignment(W_A, W_B, mean_act > 0).score
    everything = torch.ones(H, dtype=torch.bool)
    assert M.feature_strengths(W_A, W_B, mean_act, everything)["sim_metric"] == \
        M.alignment(W_A, W_B).score
