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
# # 05 · Feature strengths and a latent browser
#
# The original's `feature_strengths` output, per latent: **data strength** (mean activation on
# held-out tokens) against **model strength** (relative decoder norm). A latent far to the right
# fires often; its height says which model it writes to. Then a look at what some A-only,
# B-only and shared latents respond to: their top-activating contexts, token highlighted.

# %% tags=["parameters"]
params_file = "params/smollm2-same.yaml"
layer = "middle"
quick = False

# %%
import torch
from IPython.display import HTML

from hidden_signatures import io
from hidden_signatures.analysis import browser, figures
from hidden_signatures.crosscoders import crosscoder
from hidden_signatures.run import params, pipeline, point_analysis

run = pipeline.load_run(params_file, quick=quick)
out = pipeline.layer_dir(run, layer)
strengths = io.load_tensors(out / point_analysis.STRENGTHS_FILE)
print(f"similarity (CCA alignment): {strengths['sim_metric'].item():.4f}")

# %%
fig = figures.strength_scatter(strengths["data_strength"].numpy(), strengths["model_strength"].numpy(),
                               name_a=pipeline.display_name(run.model_a),
                               name_b=pipeline.display_name(run.model_b), title=f"{run.name} · {layer}")
figures.save_figure(fig, pipeline.figure_dir(run, layer) / "strengths")
fig

# %% [markdown]
# ## Latent browser

# %%
data = pipeline.open_pair(run, layer)
tokens = pipeline.pair_tokens(run)
model = crosscoder.load(out)
a = run.analysis
groups = browser.pick_latents(strengths["model_strength"], strengths["data_strength"], a.a_only, a.b_only,
                              (a.shared_low, a.shared_high))
HTML(browser.latent_cards(model, data, pipeline.load_tokenizer(run.model_a), tokens.ids_a, groups))
