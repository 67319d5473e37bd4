# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Is the ruler true? The metrics against planted ground truth
#
# Every number in this project is read off a crosscoder's decoder: relative norms sort latents
# into A-only, B-only and shared, sharedness averages them, alignment correlates the two
# decoders. None of that has been checked against an answer known in advance, and there are
# reasons to doubt it. A dictionary is only one of many that fit the same data: Paulo & Belrose
# (2025, "Sparse Autoencoders Trained on the Same Data Learn Different Features") found that
# SAEs trained on the same activations with different seeds share only about 30% of their
# latents. The L1 penalty can also invent model-exclusive latents (Minder et al. 2025).
#
# So before reading the real pairs we check the ruler on synthetic pairs whose features we
# planted ourselves (`hidden_signatures.validation.synthetic`): a known sparse dictionary of shared,
# A-only, B-only and analogous (rotated, shrunk) features with heavy-tailed firing rates,
# correlated groups and hierarchies, written into two "models" of different widths. We ask:
# 1. **Recovery**: does each crosscoder variant find the planted features, and does the
#    relative norm classify them right?
# 2. **Calibration**: as the planted shared fraction goes from 0 to 1, does measured
#    sharedness follow planted sharedness (the identity line), and alignment planted alignment?
# 3. **Nulls**: what does alignment read when rows are unpaired, for Gaussian decoders, and
#    between two crosscoders trained with different seeds on the same data?

# %% tags=["parameters"]
quick = False
seed = 0

# %%
import time

import pandas as pd

from hidden_signatures import io
from hidden_signatures.analysis import figures
from hidden_signatures.run import pipeline
from hidden_signatures.validation import studies

cfg = studies.ValidationConfig.for_run(quick=quick, seed=seed)
fit_kwargs = cfg.fit_kwargs()
fig_dir = pipeline.figures_root() / "validation"
started = time.perf_counter()
pd.Series({"planted features": cfg.synthetic.n_features, "widths (A, B)": (cfg.synthetic.d_a, cfg.synthetic.d_b),
           "latents": cfg.dict_size, "steps": cfg.steps, "training tokens": cfg.n_tokens,
           "seeds": cfg.seeds}, dtype=object)

# %% [markdown]
# ## 1 · Recovery and classification
# One crosscoder per architecture on the same planted pair. Latents are matched one-to-one to
# planted features (Hungarian matching on decoder cosine, kept at cosine ≥ 0.5); a matched
# latent is called A-only when n_rel ≥ 0.9, B-only when n_rel ≤ 0.1 and shared when
# 0.3 < n_rel < 0.7 (analogous features count as shared). DFC gets its exclusive slots from
# the planted class counts.

# %%
recovery = studies.recovery_study(cfg.synthetic, cfg.architectures, seed=cfg.seed, **fit_kwargs)
recovery_frame = pd.DataFrame(recovery).drop(columns="calibration").set_index("architecture")
recovery_frame.T

# %%
fig = figures.summary_heatmap(studies.recovery_matrix(recovery), title="Recovery and classification",
                              xlabel="", digits=2)
figures.save_figure(fig, fig_dir / "recovery")
fig

# %% [markdown]
# Where the matched latents of each true class land on the relative-norm axis
# (mean and quantiles of n_rel; the fraction of each class called A-only, B-only, shared or none).

# %%
pd.DataFrame(studies.calibration_table(recovery)).set_index(["architecture", "true_class"])

# %% [markdown]
# ## 2 · Calibration: measured against planted
# The planted shared fraction goes from 0 to 1; the rest is split evenly between A-only and
# B-only. Truth is the sharedness of the planted dictionary itself, with the trainer's input
# scaling applied.

# %%
sweep = studies.calibration_sweep(cfg.synthetic, cfg.shared_fractions, cfg.architectures,
                                     n_perm=cfg.n_perm, seed=cfg.seed, **fit_kwargs)
pd.DataFrame(sweep)

# %%
truth, measured = studies.calibration_series(sweep, "planted_sharedness", "measured_sharedness")
fig = figures.calibration_curve(truth, measured, title="Sharedness: measured vs planted",
                                xlabel="planted sharedness", ylabel="measured sharedness")
figures.save_figure(fig, fig_dir / "calibration_sharedness")
fig

# %% [markdown]
# Alignment's truth is the alignment of the planted decoder rows (features as samples). With
# unrelated bases in the two models (the default here, as for two different models) even a
# dictionary that is entirely shared has no linear map from A's decoder to B's, so planted
# alignment stays near the null: alignment measures a shared *geometry*, not shared features.
# A missing point means the crosscoder kept too few live latents (≤ dA + dB) for CCA to mean
# anything there; the dashed null line is the first architecture's row-permutation null.

# %%
truth, measured = studies.calibration_series(sweep, "planted_alignment", "measured_alignment",
                                                null_key="null_perm_mean")
fig = figures.calibration_curve(truth, measured, title="Alignment: measured vs planted (different bases)",
                                xlabel="planted alignment", ylabel="measured alignment")
figures.save_figure(fig, fig_dir / "calibration_alignment")
fig

# %% [markdown]
# The same sweep with one width and one basis (shared features written in the same direction
# to both models, like a model and its fine-tune): here alignment has room to move.

# %%
same_basis = studies.calibration_sweep(cfg.same_basis_synthetic(), cfg.shared_fractions,
                                          cfg.same_basis_architectures, n_perm=cfg.n_perm,
                                          seed=cfg.seed, **fit_kwargs)
truth, measured = studies.calibration_series(same_basis, "planted_alignment", "measured_alignment",
                                                null_key="null_perm_mean")
fig = figures.calibration_curve(truth, measured, title="Alignment: measured vs planted (same basis)",
                                xlabel="planted alignment", ylabel="measured alignment")
figures.save_figure(fig, fig_dir / "calibration_alignment_same_basis")
fig

# %%
pd.DataFrame(same_basis)

# %% [markdown]
# ## 3 · Nulls and the seed floor on a planted pair
# Alignment of one crosscoder beside: its rows of W_dec_B shuffled (permutation null), the
# closed-form and simulated value for independent Gaussian decoders, and two crosscoders
# trained on the same tokens with different seeds (latents paired by Hungarian matching,
# then A against A and B against B). Two untrained crosscoders through the same matching give
# the floor that matching alone produces.

# %%
seeds = studies.seed_study(cfg.synthetic, cfg.seeds, n_perm=cfg.n_perm, **fit_kwargs)
nulls = seeds["nulls"]
pd.Series({"alignment": nulls["alignment"], "permutation null": nulls["permutation"]["mean"],
           "permutation null std": nulls["permutation"]["std"],
           "Gaussian null (closed form)": nulls["gaussian_closed_form"],
           "Gaussian null (simulated)": nulls["gaussian_simulated"]["mean"], "z vs permutation": nulls["z"]})

# %%
pd.DataFrame([*seeds["cross_seed"], {"seeds": "untrained", **seeds["untrained"]}]).set_index("seeds")

# %%
spread = pd.DataFrame(seeds["spread"]).T
spread

# %% [markdown]
# ## Seed floor of the real pairs
# **Not computed here.** The seed floor of the real model pairs (several crosscoder seeds per
# pair, `validation.seed_spread` and `validation.differs` over them) needs the real pipeline
# and lives in `99_summary`.

# %% [markdown]
# ## Results file

# %%
results = {"config": cfg.to_dict(), "recovery": recovery, "calibration_sweep": sweep,
           "calibration_sweep_same_basis": same_basis, "seed_study": seeds}
io.write_json(pipeline.results_root() / "validation" / "validation.json", results, digits=6)
print(f"synthetic validation took {time.perf_counter() - started:.0f} s")
