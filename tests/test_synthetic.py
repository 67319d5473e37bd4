"""Tests for the planted-feature benchmark (hidden_signatures.validation.synthetic)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hidden_signatures.crosscoders import crosscoder
from hidden_signatures.validation import recovery
from hidden_signatures.validation import synthetic as S


def tiny_cfg(**overrides) -> S.SyntheticConfig:
    """A small valid config (d 32/48, 64 features) with optional overrides."""
    base = dict(d_a=32, d_b=48, n_features=64, frac_shared=0.4, frac_a_only=0.3,
                frac_b_only=0.2, frac_analogous=0.1, mean_active=4.0, n_corr_groups=2,
                corr_group_size=3, n_hierarchies=2, n_children=2, seed=3)
    return S.SyntheticConfig(**(base | overrides))


def test_counts_shapes_and_zero_rows():
    cfg = tiny_cfg()
    pair = S.make_pair(cfg, 500)
    assert pair.counts == {"shared": 26, "a_only": 19, "b_only": 13, "analogous": 6}  # 64 by largest remainder
    assert {c: pair.classes.count(c) for c in S.CLASSES} == pair.counts
    assert pair.x_a.shape == (500, 32) and pair.x_b.shape == (500, 48)
    assert pair.x_a.dtype == pair.x_b.dtype == torch.float32
    assert pair.D_FA.shape == (64, 32) and pair.D_FB.shape == (64, 48) and pair.acts_NF.shape == (500, 64)
    is_a = torch.tensor([c == "a_only" for c in pair.classes])
    is_b = torch.tensor([c == "b_only" for c in pair.classes])
    assert pair.D_FB[is_a].abs().max() == 0 and pair.D_FA[is_b].abs().max() == 0
    assert (pair.D_FA[~is_b].norm(dim=1) > 0.69).all() and (pair.D_FB[~is_a].norm(dim=1) > 0.69).all()


def test_firing_rate_matches_plan():
    pair = S.make_pair(tiny_cfg(), 20000)
    l0 = (pair.acts_NF > 0).float().sum(1).mean()
    assert abs(float(l0) - 4.0) < 0.1
    empirical_F = (pair.acts_NF > 0).float().mean(0)
    assert (empirical_F - pair.freq_F).abs().max() < 0.02
    assert pair.freq_F.max() / pair.freq_F[pair.freq_F > 0].min() > 10  # heavy-tailed rates


def test_deterministic_for_a_seed():
    cfg = tiny_cfg()
    p1, p2 = S.make_pair(cfg, 300), S.make_pair(cfg, 300)
    assert torch.equal(p1.x_a, p2.x_a) and torch.equal(p1.x_b, p2.x_b) and p1.classes == p2.classes
    fresh = S.make_pair(cfg, 300, data_seed=7)
    assert torch.equal(fresh.D_FA, p1.D_FA) and not torch.equal(fresh.x_a, p1.x_a)
    other = S.make_pair(dataclasses.replace(cfg, seed=4), 300)
    assert not torch.equal(other.D_FA, p1.D_FA)


def test_a_only_features_never_write_to_b():
    pair = S.make_pair(tiny_cfg(noise_std=0.0), 400)
    is_a = torch.tensor([c == "a_only" for c in pair.classes])
    zeroed_NF = pair.acts_NF.clone()
    zeroed_NF[:, is_a] = 0.0
    x_NA, x_NB = S.render(zeroed_NF, pair.D_FA, pair.D_FB, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(x_NB, pair.x_b, atol=1e-5)
    assert not torch.allclose(x_NA, pair.x_a, atol=1e-3)  # ...while they do write to A


def test_hierarchy_and_groups():
    pair = S.make_pair(tiny_cfg(), 20000)
    fire_NF = pair.acts_NF > 0
    children = (pair.parent_F >= 0).nonzero().squeeze(1)
    assert len(children) == 4
    for c in children.tolist():
        p = int(pair.parent_F[c])
        assert fire_NF[:, c].sum() > 0
        assert not (fire_NF[:, c] & ~fire_NF[:, p]).any()
    corr_FF = torch.corrcoef(fire_NF.float().T).fill_diagonal_(0.0)
    in_group = [corr_FF[g[i], g[j]] for g in pair.groups_GS.tolist()
                for i in range(len(g)) for j in range(i + 1, len(g))]
    assert torch.stack(in_group).mean() > 10 * corr_FF.abs().median()  # groups co-fire


def test_config_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        tiny_cfg(frac_shared=0.5)
    with pytest.raises(ValueError, match="same_basis"):
        tiny_cfg(same_basis=True)
    with pytest.raises(ValueError, match="magnitude"):
        tiny_cfg(magnitude="gamma")
    with pytest.raises(ValueError, match="exceed"):
        tiny_cfg(n_hierarchies=20, n_children=3)


def test_same_basis_shows_the_analogous_rotation():
    cfg = tiny_cfg(d_b=32, same_basis=True, analogous_angle_deg=60.0, analogous_shrink=0.5)
    pair = S.make_pair(cfg, 10)
    cos_F = torch.nn.functional.cosine_similarity(pair.D_FA, pair.D_FB, dim=1)
    for c, expected in (("shared", 1.0), ("analogous", 0.5)):
        idx = [f for f, k in enumerate(pair.classes) if k == c]
        assert torch.allclose(cos_F[idx], torch.full((len(idx),), expected), atol=1e-5)
    ana = [f for f, k in enumerate(pair.classes) if k == "analogous"]
    assert torch.allclose(pair.D_FB[ana].norm(dim=1), torch.full((len(ana),), 0.5), atol=1e-5)


def test_sweep_and_planted_sharedness():
    cfgs = S.sweep_configs(tiny_cfg(), [0.0, 0.5, 1.0])
    assert [c.frac_a_only for c in cfgs] == [0.5, 0.25, 0.0] and all(c.frac_analogous == 0 for c in cfgs)
    values = [recovery.planted_sharedness(c) for c in cfgs]
    assert values[0] == pytest.approx(0.0, abs=1e-12) and values[2] == pytest.approx(1.0)
    assert 0.2 < values[1] < 0.8
    truth = recovery.planted_truth(tiny_cfg(analogous_shrink=0.7))
    ana = [f for f, k in enumerate(S.make_pair(tiny_cfg(), 1).classes) if k == "analogous"]
    assert torch.allclose(truth.n_rel_F[ana], torch.full((len(ana),), 1 / 1.7, dtype=torch.float64))
    with pytest.raises(ValueError, match="shared fraction"):
        S.sweep_configs(tiny_cfg(), [1.5])


def test_matching_recovers_a_permutation():
    pair = S.make_pair(tiny_cfg(), 10)
    gen = torch.Generator().manual_seed(0)
    perm_H = torch.randperm(64, generator=gen)  # latent h is planted feature perm_H[h]
    W_dec_HA = torch.cat([pair.D_FA[perm_H], torch.randn(16, 32, generator=gen)])
    W_dec_HB = torch.cat([pair.D_FB[perm_H], torch.randn(16, 48, generator=gen)])
    W_dec_HA += 1e-3 * torch.randn(W_dec_HA.shape, generator=gen)
    W_dec_HB += 1e-3 * torch.randn(W_dec_HB.shape, generator=gen)
    result = recovery.match_latents(W_dec_HA, W_dec_HB, pair.D_FA, pair.D_FB)
    assert result.recovered_frac == 1.0
    assert torch.equal(result.feature_to_latent_F[perm_H], torch.arange(64))
    assert (result.cos_M > 0.99).all()
    assert recovery.match_latents(W_dec_HA, W_dec_HB, pair.D_FA, pair.D_FB, min_cos=1.01).recovered_frac == 0.0


def _hand_built():
    n_rel_H = torch.tensor([0.95, 0.92, 0.5, 0.05, 0.6, 0.8, 0.02, 0.45])
    truth = ["a_only", "shared", "shared", "b_only", "analogous", "a_only", "a_only", "b_only"]
    idx = torch.arange(7)  # latent i <-> feature i; feature 7 unmatched
    matches = recovery.MatchResult(latent_idx_M=idx, feature_idx_M=idx, cos_M=torch.ones(7),
                            feature_to_latent_F=torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]),
                            recovered_frac=7 / 8)
    return n_rel_H, matches, truth


def test_classification_report_by_hand():
    n_rel_H, matches, truth = _hand_built()
    rep = recovery.classification_report(n_rel_H, matches, truth)
    a, b, s = (rep["per_class"][c] for c in ("a_only", "b_only", "shared"))
    assert (a["precision"], a["recall"], a["recall_planted"]) == (0.5, pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert (b["precision"], b["recall"], b["recall_planted"]) == (0.5, 1.0, 0.5)
    assert (s["precision"], s["recall"]) == (1.0, pytest.approx(2 / 3))
    cal = rep["calibration"]["a_only"]
    assert cal["n"] == 3 and cal["mean"] == pytest.approx((0.95 + 0.8 + 0.02) / 3)
    assert cal["q50"] == pytest.approx(0.8)
    assert (cal["frac_pred_a_only"], cal["frac_pred_none"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert rep["calibration"]["analogous"]["mean"] == pytest.approx(0.6)
    strict = recovery.classification_report(n_rel_H, matches, truth, analogous_as=None)["per_class"]["shared"]
    assert (strict["precision"], strict["recall"], strict["n_true"]) == (1.0, 0.5, 2)
    with pytest.raises(ValueError, match="thresholds"):
        recovery.classification_report(n_rel_H, matches, truth, a_thr=0.6)


@pytest.mark.parametrize("frac_shared, check", [(1.0, lambda v: v > 0.9), (0.0, lambda v: v < 0.2)])
def test_trained_crosscoder_reads_planted_sharedness(frac_shared, check):
    cfg = S.sweep_configs(tiny_cfg(n_features=48), [frac_shared])[0]
    pair = S.make_pair(cfg, 4000)
    cc_cfg = crosscoder.CrosscoderConfig(d_a=32, d_b=48, dict_size=128)
    model = recovery.fit_crosscoder(pair, cc_cfg, steps=300, batch_size=256, lr=2e-3, l1_coeff=1.0, seed=0)
    value = recovery.measured_sharedness(model, S.make_pair(cfg, 4000, data_seed=11))
    assert check(value), value
    assert math.isclose(recovery.planted_sharedness(cfg), frac_shared)
    assert recovery.match_latents(model.W_dec_A, model.W_dec_B, pair.D_FA, pair.D_FB).recovered_frac > 0.9
