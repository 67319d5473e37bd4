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
# # 04 · Analysis: how much do the two models share at this layer?
#
# Read off the trained crosscoder's decoder (PAPER.md):
# - **relative norm** n_rel = ‖d_A‖ / (‖d_A‖ + ‖d_B‖) per latent: 1 only in A, 0 only in B, 0.5 shared;
# - **sharedness**: activation-weighted binary entropy of n_rel, normalised (1 = all shared);
# - **alignment**: mean squared canonical correlation between the two decoders, over live latents
#   (firing on at least `analysis.min_fire_rate` of held-out tokens: a rarer latent has had too
#   few updates to leave its random, independently initialised A and B rows; also reported over
#   every latent that fires at all, and over all latents);
# - beside them the classic baselines on the raw activations: linear **CKA** and **SVCCA**.

# %% tags=["parameters"]
params_file = "params/smollm2-same.yaml"
layer = "middle"
quick = False

# %%
import pandas as pd

import torch
from IPython.display import display

from hidden_signatures import io
from hidden_signatures.analysis import figures, metrics
from hidden_signatures.crosscoders import crosscoder
from hidden_signatures.run import params, pipeline, point_analysis

run = pipeline.load_run(params_file, quick=quick)
tokens = pipeline.pair_tokens(run)
data = pipeline.open_pair(run, layer)
result = point_analysis.analyse_layer(run, layer, data, aligned_fraction=tokens.aligned_fraction)
keys = ["sharedness", "alignment", "alignment_any_fire", "alignment_all_latents", "n_live", "cka", "svcca", "explained_variance",
        "l0", "dead_fraction", "tokens", "token_ceiling", "converged", "ev_window_gain", "target_l0", "final_l1_coeff", "aligned_fraction"]
pd.Series({k: result[k] for k in keys}, dtype=object)

# %% [markdown]
# ## Convergence
# Held-out explained variance of both models, L0 and the share of dead latents (no firing on the
# held-out tokens) against training tokens. Training stops when explained variance gains less than
# `train.converge_gain` over the last `train.converge_window` of the tokens (then the learning rate
# decays), or at the token ceiling `train.tokens` (`ev_window_gain` above: how much explained variance
# still changed over that window when training stopped; for a run the ceiling stopped, measured up to
# where its decay began); with `train.target_l0` the L1 weight is steered
# so that L0 settles at the target; dead latents are resampled at each evaluation until three
# quarters of the final decay are over.

# %%
point_analysis.convergence_figure(run, layer)

# %% [markdown]
# ## Relative decoder norms
# Three modes are expected: latents only in B (left), shared (centre), only in A (right).
# Identical models put every live latent at 0.5.

# %%
model = crosscoder.load(pipeline.layer_dir(run, layer))
W_A, W_B = point_analysis.decoders(model)
n_rel = metrics.relative_norms(W_A, W_B)
fire_rate = pd.read_csv(pipeline.layer_dir(run, layer) / point_analysis.STRENGTHS_CSV)["fire_rate"].to_numpy()
live = fire_rate >= run.analysis.min_fire_rate  # rarer latents keep their random initialisation
figures.relative_norm_histogram(n_rel.numpy()[live], name_a=pipeline.display_name(run.model_a),
                               name_b=pipeline.display_name(run.model_b),
                                title=f"{run.name} · {layer}")

# %%
pd.Series(result["latent_classes"])

# %% [markdown]
# ## Decoder cosine of shared latents
# For latents with 0.3 < n_rel < 0.7 (only when both models have the same width): does the
# latent write the same direction into both models?

# %%
if data.d_a == data.d_b:
    cos = metrics.shared_cosines(W_A[torch.from_numpy(live)], W_B[torch.from_numpy(live)])
    display(figures.cosine_histogram(cos.numpy(), title=f"{run.name} · {layer}: shared latents"))
else:
    print(f"widths differ ({data.d_a} vs {data.d_b}): decoder cosines are not defined")

# %% [markdown]
# ## Splice-in fidelity
# Each model runs with the residual stream entering this block replaced by the crosscoder's
# reconstruction (held-out sequences): the next-token loss increase, and the KL from the clean
# run, beside zeroing the stream at the same positions (for scale).

# %%
pd.DataFrame(result["splice"]).T if result.get("splice") else "splice-in skipped (analysis.splice_seqs: 0, or another seed of the main crosscoder)"

# %% [markdown]
# ## Canonical correlations between the two decoders
# Beside the score, its null: the same decoders with the rows of B shuffled (pairs broken).

# %%
live_H = torch.from_numpy(live)
null = metrics.permutation_null_alignment(W_A, W_B, n_perm=3, live_mask_H=live_H)
print(f"alignment {result['alignment']:.4f}   permutation null {null['mean']:.4f} ± {null['std']:.4f}")
figures.cca_spectrum(metrics.alignment(W_A, W_B, live_mask_H=live_H).spectrum.numpy(),
                     title="canonical correlations (live latents)")

# %% [markdown]
# ## Latent Scaling: are the exclusive latents really exclusive?
# For each A-only (B-only) latent, the scale with which its direction explains the *other*
# model's reconstruction error, relative to its own model (Minder et al. 2025). Near 0: truly
# exclusive. Large: the other model carries the direction too, and the L1 crosscoder only made
# the latent look exclusive.

# %%
scaling = io.load_tensors(pipeline.layer_dir(run, layer) / point_analysis.SCALING_FILE)
print(result["latent_scaling"])
if "other_model_ratio" in scaling:
    side = ["A-only" if n_rel[i] > 0.5 else "B-only" for i in scaling["latents"].tolist()]
    display(figures.latent_scaling_scatter(scaling["other_model_ratio"].numpy(), n_rel[scaling["latents"]].numpy(),
                                           labels=side, xlabel="other model's scale / own scale (error)",
                                           ylabel="relative norm", title="Latent Scaling of exclusive latents"))

# %% [markdown]
# ## Other crosscoders at this layer
# When the params file trains other architectures (BatchTopK, dedicated-feature) or seeds at
# this layer, their relative-norm histograms sit side by side, with reconstruction (explained
# variance) against sparsity (L0).

# %%
names = point_analysis.sibling_points(run, layer)
if len(names) > 1 and layer == pipeline.point(run, layer).label:  # once per layer, at its main point
    hists, rows = point_analysis.compare_points(run, names, data)
    display(figures.relative_norm_histograms(hists, name_a=pipeline.display_name(run.model_a),
                                             name_b=pipeline.display_name(run.model_b)))
    display(pd.DataFrame(rows))
elif len(names) > 1:
    print(f"side by side in the notebook of the layer's main crosscoder, {pipeline.point(run, layer).label}")
else:
    print("one crosscoder at this layer")
