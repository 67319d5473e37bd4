"""Is the ruler true? The crosscoder metrics checked against planted ground truth, with nulls (issue 11).

On synthetic pairs whose features are known (synthetic.py) we ask: does a trained crosscoder
recover the planted features, does its relative norm sort them into A-only / B-only / shared,
does measured sharedness track planted sharedness, and does decoder alignment (CCA) read above
what unpaired rows, Gaussian decoders or a second training seed give? Plain functions,
deterministic for their seeds; the notebook 07_validation.py calls them one per cell.

Shapes ride on names: N tokens, F planted features, H latents, A/B the two models' widths.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..analysis import metrics
from ..crosscoders import crosscoder
from ..crosscoders.evaluate import explained_variance
from . import recovery
from . import synthetic as syn
from .config import (ARCHITECTURES, EVAL_SEED_OFFSET, SHARED_FRACTIONS, ValidationConfig,  # noqa: F401
                     check_architectures, check_fractions)
from .nulls import MATCH_MIN_COS, alignment_or_nan, cross_seed_alignment, differs, null_baselines, seed_spread  # noqa: F401

# -- one planted pair, one crosscoder ---------------------------------------------------------------
def planted_pairs(cfg: syn.SyntheticConfig, n_tokens: int, n_eval_tokens: int
                  ) -> tuple[syn.SyntheticPair, syn.SyntheticPair]:
    """Training and held-out evaluation tokens from one planted dictionary (no dense feature acts kept)."""
    train = syn.make_pair(cfg, n_tokens, keep_acts=False)
    held_out = syn.make_pair(cfg, n_eval_tokens, data_seed=cfg.seed + EVAL_SEED_OFFSET, keep_acts=False)
    return train, held_out


def dfc_sizes(cfg: syn.SyntheticConfig, dict_size: int) -> dict[str, int]:
    """DFC slots from the planted class counts, scaled by H / F so each class keeps its dictionary share."""
    counts = cfg.class_counts()
    n_a = min(dict_size, int(round(counts["a_only"] * dict_size / cfg.n_features)))
    n_b = min(dict_size - n_a, int(round(counts["b_only"] * dict_size / cfg.n_features)))
    return {"a_only": n_a, "b_only": n_b}


def crosscoder_config(cfg: syn.SyntheticConfig, architecture: str, dict_size: int, k: int = 8,
                      dead_after_tokens: int = 20_000) -> crosscoder.CrosscoderConfig:
    """The crosscoder config for a synthetic pair; DFC gets its slots from the planted counts."""
    check_architectures([architecture])
    sizes = dfc_sizes(cfg, dict_size) if architecture == "dfc" else {}
    return crosscoder.CrosscoderConfig(d_a=cfg.d_a, d_b=cfg.d_b, dict_size=dict_size,
                                       architecture=architecture, k=k, dfc_sizes=sizes,
                                       aux_k=min(512, dict_size // 2),
                                       dead_after_tokens=dead_after_tokens)


@dataclass
class PlantedFit:
    """A crosscoder trained on a planted pair, with what the metrics need."""

    architecture: str
    seed: int
    model: crosscoder.Crosscoder
    train: syn.SyntheticPair
    held_out: syn.SyntheticPair
    mean_act_H: torch.Tensor
    """Mean latent activation on the held-out tokens, float64 [H]."""
    live_H: torch.Tensor
    """Latents that fire on the held-out tokens, bool [H]."""


def fit_planted(train: syn.SyntheticPair, held_out: syn.SyntheticPair, architecture: str,
                steps: int = 1000, dict_size: int = 512, batch_size: int = 256, lr: float = 2e-3,
                l1_coeff: float = 1.0, k: int = 8, dead_after_tokens: int = 20_000,
                seed: int = 0) -> PlantedFit:
    """Train one crosscoder (synthetic.fit_crosscoder) and measure its latents on held-out tokens."""
    cc_cfg = crosscoder_config(train.cfg, architecture, dict_size, k, dead_after_tokens)
    model = recovery.fit_crosscoder(train, cc_cfg, steps=steps, batch_size=batch_size, lr=lr,
                               l1_coeff=l1_coeff, seed=seed)
    mean_act_H = recovery.latent_mean_acts(model, held_out)
    return PlantedFit(architecture, seed, model, train, held_out, mean_act_H, mean_act_H > 0)


@torch.no_grad()
def explained_variances(fit: PlantedFit) -> tuple[float, float]:
    """Explained variance of each model's (scaled) held-out activations, PAPER.md's definition."""
    s_a, s_b = recovery.norm_factors(fit.held_out.x_a, fit.held_out.x_b)
    x_NA, x_NB = fit.held_out.x_a * s_a, fit.held_out.x_b * s_b
    _, xhat_NA, xhat_NB = fit.model(x_NA, x_NB)
    return float(explained_variance(x_NA, xhat_NA)), float(explained_variance(x_NB, xhat_NB))


# -- 1. recovery ------------------------------------------------------------------------------------
def recovery_row(fit: PlantedFit, min_cos: float = 0.5) -> dict:
    """Recovered fraction, precision/recall of A-only/B-only/shared calls and n_rel calibration of one fit.

    Latents are matched to planted features by Hungarian matching on decoder cosine
    (synthetic.match_latents); classes come from relative norm (synthetic.classification_report,
    analogous features counted as shared). 'calibration' holds n_rel's distribution per true class.
    """
    W_A, W_B = fit.model.W_dec_A.detach(), fit.model.W_dec_B.detach()
    matches = recovery.match_latents(W_A, W_B, fit.train.D_FA, fit.train.D_FB, min_cos=min_cos)
    report = recovery.classification_report(metrics.relative_norms(W_A, W_B), matches, fit.train.classes)
    ev_a, ev_b = explained_variances(fit)
    scales = recovery.norm_factors(fit.train.x_a, fit.train.x_b)
    row = {"architecture": fit.architecture, "seed": fit.seed, "dict_size": W_A.shape[0],
           "n_live": int(fit.live_H.sum()), "ev_a": ev_a, "ev_b": ev_b,
           "recovered_frac": matches.recovered_frac, "n_matched": report["n_matched"]}
    for c in syn.PRED_CLASSES:
        for key in ("precision", "recall", "recall_planted"):
            row[f"{c}_{key}"] = report["per_class"][c][key]
    row["planted_sharedness"] = recovery.planted_sharedness(fit.train.cfg, scales)
    row["measured_sharedness"] = metrics.sharedness(W_A, W_B, fit.mean_act_H)
    row["calibration"] = report["calibration"]
    return row


def recovery_study(base_cfg: syn.SyntheticConfig, architectures: Sequence[str] = ARCHITECTURES,
                   n_tokens: int = 16384, steps: int = 1000, n_eval_tokens: int = 4096,
                   dict_size: int = 512, batch_size: int = 256, lr: float = 2e-3,
                   l1_coeff: float = 1.0, k: int = 8, dead_after_tokens: int = 20_000,
                   seed: int = 0) -> list[dict]:
    """One recovery_row per architecture, all trained on the same planted pair with the same seed."""
    check_architectures(architectures)
    train, held_out = planted_pairs(base_cfg, n_tokens, n_eval_tokens)
    fit_kw = dict(steps=steps, dict_size=dict_size, batch_size=batch_size, lr=lr,
                  l1_coeff=l1_coeff, k=k, dead_after_tokens=dead_after_tokens, seed=seed)
    return [recovery_row(fit_planted(train, held_out, arch, **fit_kw)) for arch in architectures]


def calibration_table(rows: Sequence[dict]) -> list[dict]:
    """Flatten the per-class n_rel calibration of recovery rows: one row per (architecture, true class)."""
    out = []
    for row in rows:
        for true_class, cal in row["calibration"].items():
            out.append({"architecture": row["architecture"], "true_class": true_class, **cal})
    return out


RECOVERY_COLUMNS = ("recovered_frac", "a_only_precision", "a_only_recall", "b_only_precision",
                    "b_only_recall", "shared_precision", "shared_recall")


def recovery_matrix(rows: Sequence[dict], columns: Sequence[str] = RECOVERY_COLUMNS
                    ) -> dict[str, dict[str, float]]:
    """{architecture: {column: value}} from recovery rows, for figures.summary_heatmap."""
    return {row["architecture"]: {c: float(row[c]) for c in columns} for row in rows}


# -- 2. calibration sweep ---------------------------------------------------------------------------
def calibration_sweep(base_cfg: syn.SyntheticConfig, shared_fractions: Sequence[float] = SHARED_FRACTIONS,
                      architectures: Sequence[str] = ARCHITECTURES, n_tokens: int = 16384,
                      steps: int = 1000, n_eval_tokens: int = 4096, dict_size: int = 512,
                      batch_size: int = 256, lr: float = 2e-3, l1_coeff: float = 1.0, k: int = 8,
                      dead_after_tokens: int = 20_000, n_perm: int = 20, seed: int = 0) -> list[dict]:
    """Planted vs measured sharedness and alignment over planted shared fractions, per architecture.

    Each fraction s plants s shared features and (1 - s)/2 each A-only and B-only
    (synthetic.sweep_configs). Truth: planted sharedness (with the trainer's input scaling) and
    planted alignment (metrics.alignment of the planted decoder rows, features as samples).
    Measured: sharedness with held-out mean activations, alignment over live latents, and that
    alignment's row-permutation null and Gaussian closed-form null. NaN marks an alignment with
    too few rows (<= dA + dB) to mean anything.
    """
    check_architectures(architectures)
    check_fractions(shared_fractions)
    rows = []
    for frac, cfg in zip(shared_fractions, syn.sweep_configs(base_cfg, shared_fractions)):
        train, held_out = planted_pairs(cfg, n_tokens, n_eval_tokens)
        truth = {"shared_fraction": float(frac),
                 "planted_sharedness": recovery.planted_sharedness(cfg, recovery.norm_factors(train.x_a, train.x_b)),
                 "planted_alignment": alignment_or_nan(train.D_FA, train.D_FB)}
        for arch in architectures:
            fit = fit_planted(train, held_out, arch, steps=steps, dict_size=dict_size,
                              batch_size=batch_size, lr=lr, l1_coeff=l1_coeff, k=k,
                              dead_after_tokens=dead_after_tokens, seed=seed)
            rows.append({"architecture": arch, **truth, **_measured(fit, n_perm, seed)})
    return rows


def _measured(fit: PlantedFit, n_perm: int, seed: int) -> dict:
    """Measured sharedness, alignment and its nulls for one fit."""
    W_A, W_B = fit.model.W_dec_A.detach(), fit.model.W_dec_B.detach()
    nulls = null_baselines(W_A, W_B, fit.live_H, n_perm=n_perm, n_sim=0, seed=seed)
    return {"measured_sharedness": metrics.sharedness(W_A, W_B, fit.mean_act_H),
            "measured_alignment": nulls["alignment"], "n_live": nulls["n_live"],
            "null_perm_mean": nulls["permutation"]["mean"], "null_perm_std": nulls["permutation"]["std"],
            "null_gaussian": nulls["gaussian_closed_form"],
            "recovered_frac": recovery.match_latents(W_A, W_B, fit.train.D_FA, fit.train.D_FB).recovered_frac}


def calibration_series(rows: Sequence[dict], truth_key: str, measured_key: str,
                       null_key: str | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """(truth, {architecture: measured}) from sweep rows, for figures.calibration_curve.

    All architectures must share the truth values (they do: the sweep trains them on the same
    pairs). With null_key, the first architecture's null is added as one more series. A series
    with no finite value (e.g. alignment with too few live latents everywhere) is left out.
    """
    archs = list(dict.fromkeys(r["architecture"] for r in rows))
    if not archs:
        raise ValueError("calibration_series: rows is empty")
    by_arch = {a: [r for r in rows if r["architecture"] == a] for a in archs}
    truth = [float(r[truth_key]) for r in by_arch[archs[0]]]
    measured = {}
    for arch, arch_rows in by_arch.items():
        other = [float(r[truth_key]) for r in arch_rows]
        if len(other) != len(truth) or any(not math.isclose(x, y, abs_tol=1e-9)
                                           for x, y in zip(truth, other) if not math.isnan(x)):
            raise ValueError(f"calibration_series: {arch!r} has other {truth_key} values than {archs[0]!r}")
        measured[arch] = [_num(r[measured_key]) for r in arch_rows]
    if null_key is not None:
        measured[f"null ({archs[0]})"] = [_num(r[null_key]) for r in by_arch[archs[0]]]
    return truth, {name: v for name, v in measured.items() if any(math.isfinite(x) for x in v)}


def _num(value: float | None) -> float:
    """A float, NaN for None (a value that could not be computed)."""
    return float("nan") if value is None else float(value)


def seed_study(base_cfg: syn.SyntheticConfig, seeds: Sequence[int] = (0, 1, 2),
               architecture: str = "relu_l1", n_tokens: int = 16384, steps: int = 1000,
               n_eval_tokens: int = 4096, dict_size: int = 512, batch_size: int = 256,
               lr: float = 2e-3, l1_coeff: float = 1.0, k: int = 8, dead_after_tokens: int = 20_000,
               n_perm: int = 20) -> dict:
    """The seed floor on a planted pair: one crosscoder per training seed on the same tokens.

    per_seed: recovered fraction, sharedness, alignment per seed; spread: seed_spread of each;
    cross_seed: cross_seed_alignment for every pair of seeds; untrained: the same for two
    untrained crosscoders (the matching floor); nulls: null_baselines of the first seed's model.
    """
    if len(seeds) < 2:
        raise ValueError(f"seed_study: seeds {list(seeds)!r}; need at least 2")
    train, held_out = planted_pairs(base_cfg, n_tokens, n_eval_tokens)
    fits = [fit_planted(train, held_out, architecture, steps=steps, dict_size=dict_size,
                        batch_size=batch_size, lr=lr, l1_coeff=l1_coeff, k=k,
                        dead_after_tokens=dead_after_tokens, seed=s) for s in seeds]
    per_seed = [{"seed": f.seed, **_measured(f, n_perm, f.seed)} for f in fits]
    keys = ("recovered_frac", "measured_sharedness", "measured_alignment")
    cross = [{"seeds": [a.seed, b.seed], **cross_seed_alignment(a.model, b.model, a.live_H, b.live_H)}
             for a, b in itertools.combinations(fits, 2)]
    cc_cfg = fits[0].model.cfg
    untrained = cross_seed_alignment(crosscoder.build(cc_cfg, seeds[0]), crosscoder.build(cc_cfg, seeds[1]))
    W_A, W_B = fits[0].model.W_dec_A.detach(), fits[0].model.W_dec_B.detach()
    return {"architecture": architecture, "seeds": list(seeds), "per_seed": per_seed,
            "spread": {key: seed_spread([r[key] for r in per_seed]) for key in keys},
            "cross_seed": cross, "untrained": untrained,
            "nulls": null_baselines(W_A, W_B, fits[0].live_H, n_perm=n_perm, seed=seeds[0])}
