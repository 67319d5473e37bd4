"""Tests for the ruler checks against planted truth (hidden_signatures.validation.studies)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from hidden_signatures import io
from hidden_signatures.crosscoders import crosscoder
from hidden_signatures.validation import synthetic as S
from hidden_signatures.validation import studies as V

RECOVERY_KEYS = {"architecture", "seed", "dict_size", "n_live", "ev_a", "ev_b", "recovered_frac",
                 "n_matched", "planted_sharedness", "measured_sharedness", "calibration"} | {
    f"{c}_{k}" for c in S.PRED_CLASSES for k in ("precision", "recall", "recall_planted")}
SWEEP_KEYS = {"architecture", "shared_fraction", "planted_sharedness", "planted_alignment",
              "measured_sharedness", "measured_alignment", "n_live", "null_perm_mean",
              "null_perm_std", "null_gaussian", "recovered_frac"}


def tiny_cfg(**overrides) -> S.SyntheticConfig:
    """A small valid planted dictionary (d 16/24, 48 features) with optional overrides."""
    base = dict(d_a=16, d_b=24, n_features=48, mean_active=4.0, n_corr_groups=2,
                corr_group_size=3, n_hierarchies=2, n_children=2, seed=5)
    return S.SyntheticConfig(**(base | overrides))


TINY_FIT = dict(n_tokens=3000, n_eval_tokens=1000, dict_size=96, batch_size=256, lr=2e-3, k=4,
                dead_after_tokens=5000)


# -- nulls --------------------------------------------------------------------------------------
def test_permutation_null_of_identical_decoders_is_far_below_one():
    W_HD = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    out = V.null_baselines(W_HD, W_HD, n_perm=10, n_sim=5, seed=0)
    assert out["alignment"] == pytest.approx(1.0, abs=1e-3)  # 1 up to metrics' small ridge (H < 10 d)
    assert out["permutation"]["mean"] < 0.3 and len(out["permutation"]["values"]) == 10
    assert out["gaussian_closed_form"] == pytest.approx(16 / 255)
    assert out["gaussian_simulated"]["mean"] == pytest.approx(16 / 255, abs=0.03)
    assert out["excess"] > 0.6 and out["z"] > 10
    again = V.null_baselines(W_HD, W_HD, n_perm=10, n_sim=5, seed=0)
    assert again["permutation"]["values"] == out["permutation"]["values"]


def test_null_baselines_respects_live_mask_and_refuses_too_few_rows():
    gen = torch.Generator().manual_seed(1)
    W_A, W_B = torch.randn(200, 8, generator=gen), torch.randn(200, 12, generator=gen)
    live_H = torch.arange(200) < 150
    out = V.null_baselines(W_A, W_B, live_H, n_perm=3, n_sim=0)
    assert (out["n_live"], out["n_total"]) == (150, 200) and out["gaussian_simulated"] is None
    assert out["gaussian_closed_form"] == pytest.approx(12 / 149)
    few = V.null_baselines(W_A, W_B, torch.arange(200) < 20, n_perm=3)
    assert few["n_live"] == 20 and math.isnan(few["alignment"]) and math.isnan(few["z"])


def _tiny_model(seed: int, H: int = 64) -> crosscoder.Crosscoder:
    return crosscoder.build(crosscoder.CrosscoderConfig(d_a=8, d_b=12, dict_size=H), seed)


def test_cross_seed_alignment_of_a_model_with_itself_is_one():
    model = _tiny_model(0)
    out = V.cross_seed_alignment(model, model)
    assert out["alignment_A"] == pytest.approx(1.0, abs=1e-3)  # 1 up to metrics' small ridge
    assert out["alignment_B"] == pytest.approx(1.0, abs=1e-3)
    assert out["mean_cos"] == pytest.approx(1.0) and out["frac_above_min_cos"] == 1.0
    # the same dictionary with its latents in another order: matching undoes the shuffle
    shuffled = _tiny_model(0)
    perm_H = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shuffled.W_dec_A.copy_(model.W_dec_A[perm_H])
        shuffled.W_dec_B.copy_(model.W_dec_B[perm_H])
    assert V.cross_seed_alignment(model, shuffled)["alignment_A"] == pytest.approx(out["alignment_A"], abs=1e-12)
    other = V.cross_seed_alignment(model, _tiny_model(1))
    assert other["alignment_A"] < 0.9 and other["frac_above_min_cos"] < 0.1


def test_cross_seed_alignment_checks_widths_and_uses_live_rows():
    model = _tiny_model(0)
    live_H = torch.arange(64) < 50
    assert V.cross_seed_alignment(model, model, live_H, live_H)["n_matched"] == 50
    wide = crosscoder.build(crosscoder.CrosscoderConfig(d_a=8, d_b=16, dict_size=64), 0)
    with pytest.raises(ValueError, match="widths"):
        V.cross_seed_alignment(model, wide)


# -- seed spread --------------------------------------------------------------------------------
def test_seed_spread_by_hand():
    assert V.seed_spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert V.seed_spread([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="seed_spread"):
            V.seed_spread(bad)


def test_differs_uses_the_larger_range():
    a = V.seed_spread([1.0, 1.1])                      # mean 1.05, range 0.1
    assert V.differs(a, V.seed_spread([1.5, 1.6]))     # |0.5| > 0.1
    assert not V.differs(a, V.seed_spread([1.05, 1.3]))  # |0.125| < 0.25, b's range
    assert V.differs(V.seed_spread([1.05, 1.3]), V.seed_spread([1.5, 1.6]))  # |0.375| > 0.25
    assert V.differs(a, a) is False
    with pytest.raises(ValueError, match="need >= 2"):
        V.differs(a, V.seed_spread([2.0]))


# -- studies on tiny planted pairs ----------------------------------------------------------------
def test_recovery_study_rows():
    cfg = tiny_cfg()
    rows = V.recovery_study(cfg, V.ARCHITECTURES, steps=150, seed=0, **TINY_FIT)
    assert [r["architecture"] for r in rows] == list(V.ARCHITECTURES)
    for row in rows:
        assert set(row) == RECOVERY_KEYS
        assert 0.0 <= row["recovered_frac"] <= 1.0 and row["n_live"] <= 96
        for c in S.PRED_CLASSES:
            for k in ("precision", "recall", "recall_planted"):
                v = row[f"{c}_{k}"]
                assert math.isnan(v) or 0.0 <= v <= 1.0, (row["architecture"], c, k, v)
        assert set(row["calibration"]) == set(S.CLASSES)
    relu = rows[0]
    assert relu["recovered_frac"] > 0.5 and not math.isnan(relu["shared_precision"])
    table = V.calibration_table(rows)
    assert len(table) == 3 * len(S.CLASSES) and {"architecture", "true_class", "n"} <= set(table[0])


def test_recovery_study_is_deterministic():
    cfg = tiny_cfg()
    kw = dict(TINY_FIT, steps=30, seed=2)
    first, second = (io.to_json(V.recovery_study(cfg, ("relu_l1",), **kw)) for _ in range(2))
    assert first == second


def test_dfc_slots_follow_planted_counts():
    cfg = tiny_cfg(frac_shared=0.5, frac_a_only=0.25, frac_b_only=0.25, frac_analogous=0.0)
    assert V.dfc_sizes(cfg, 96) == {"a_only": 24, "b_only": 24}
    cc = V.crosscoder_config(cfg, "dfc", 96)
    model = crosscoder.build(cc, 0)
    assert (model.W_dec_B[:24] == 0).all() and (model.W_dec_A[24:48] == 0).all()


def test_calibration_sweep_tracks_planted_sharedness():
    cfg = tiny_cfg(d_a=32, d_b=48)
    rows = V.calibration_sweep(cfg, (0.0, 1.0), ("relu_l1",), n_tokens=4000, n_eval_tokens=2000,
                               steps=300, dict_size=128, lr=2e-3, n_perm=3, seed=0)
    assert [r["shared_fraction"] for r in rows] == [0.0, 1.0]
    assert all(set(r) == SWEEP_KEYS for r in rows)
    lo, hi = rows
    assert lo["planted_sharedness"] == pytest.approx(0.0, abs=1e-12) and hi["planted_sharedness"] > 0.99
    assert hi["measured_sharedness"] > lo["measured_sharedness"] + 0.5
    truth, measured = V.calibration_series(rows, "planted_sharedness", "measured_sharedness",
                                           null_key="null_perm_mean")
    assert truth == [lo["planted_sharedness"], hi["planted_sharedness"]]
    assert list(measured) == ["relu_l1", "null (relu_l1)"]


def test_calibration_series_checks_truth_and_drops_empty_series():
    rows = [{"architecture": "a", "x": 0.0, "y": 0.1}, {"architecture": "b", "x": 0.5, "y": 0.2}]
    with pytest.raises(ValueError, match="other x values"):
        V.calibration_series(rows, "x", "y")
    rows = [{"architecture": "a", "x": 0.0, "y": 0.1, "n": None},
            {"architecture": "b", "x": 0.0, "y": float("nan"), "n": 0.3}]
    truth, measured = V.calibration_series(rows, "x", "y", null_key="n")
    assert truth == [0.0] and list(measured) == ["a"]  # all-NaN series (b, the null of a) dropped


def test_seed_study_structure_and_floor():
    out = V.seed_study(tiny_cfg(), (0, 1), steps=200, n_perm=3, **TINY_FIT)
    assert [r["seed"] for r in out["per_seed"]] == [0, 1] and out["spread"]["recovered_frac"]["n"] == 2
    (cross,) = out["cross_seed"]
    assert cross["seeds"] == [0, 1]
    assert cross["frac_above_min_cos"] > out["untrained"]["frac_above_min_cos"]
    assert out["nulls"]["n_total"] == 96


# -- configuration ----------------------------------------------------------------------------------
def test_validation_config():
    quick, full = V.ValidationConfig.quick(), V.ValidationConfig()
    assert quick.steps < full.steps and quick.seeds == (0, 1) and full.seeds == (0, 1, 2)
    assert V.ValidationConfig.for_run(seed=4).synthetic.seed == 4
    for fn in (V.recovery_study, V.calibration_sweep, V.seed_study):
        assert set(full.fit_kwargs()) <= set(inspect.signature(fn).parameters)
    assert full.same_basis_synthetic().d_b == full.synthetic.d_a
    for bad in (dict(dict_size=100), dict(n_seeds=1), dict(architectures=("nope",)),
                dict(shared_fractions=(1.5,)), dict(steps=0)):
        with pytest.raises(ValueError, match="validation"):
            dataclasses.replace(full, **bad)
