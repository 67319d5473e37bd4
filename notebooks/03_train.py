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
# # 03 · Training the crosscoder at one layer
#
# One dictionary reads both models' activations and writes both back (PAPER.md): a shared
# encoder bias, ReLU, and an L1 penalty weighted by the sum of each latent's two decoder
# norms. Adam with an L1 warm-up and a final learning-rate decay; bf16 autocast on the CPU.
# Checkpoints are written as it goes, and an interrupted run resumes where it stopped.

# %% tags=["parameters"]
params_file = "params/smollm2-same.yaml"
layer = "middle"
quick = False

# %%
import pandas as pd

from hidden_signatures import io
from hidden_signatures.analysis import figures
from hidden_signatures.crosscoders import train
from hidden_signatures.run import params, pipeline

run = pipeline.load_run(params_file, quick=quick)
data = pipeline.open_pair(run, layer)
out = pipeline.train_layer(run, layer, data)
log = io.read_json(out / train.LOG_FILE)
pd.Series({"blocks (A, B)": (data.layer_a, data.layer_b), "widths (A, B)": (data.d_a, data.d_b),
           "training rows": data.n_train, "steps": log[-1]["step"], "tokens trained": log[-1]["tokens"],
           "dictionary": run.crosscoder.dict_size}, dtype=object)

# %% [markdown]
# ## Training curves
# Per-batch numbers over the training run; `l1_coeff` is the L1 weight the controller steers
# towards `train.target_l0`. The held-out curve and the stopping verdict are in 04_analysis.

# %%
figures.training_curves(log, ["loss", "l0", "l1_coeff", "ev_a", "ev_b", "dead_fraction"])

# %%
pd.DataFrame(log).tail(3)
