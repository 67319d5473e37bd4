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
# # 02 · Activations: the residual stream entering each compared block
#
# One nnsight trace per batch saves the input of every block we compare and stops after the
# deepest one, in bf16. Rows are written to a memory-mapped store on disk (position 0, the
# BOS / attention-sink token, is never kept). Each model's activations are later scaled by
# sqrt(d) / mean‖x‖ so that both sides weigh the same in the crosscoder's loss.

# %% tags=["parameters"]
params_file = "params/smollm2-same.yaml"
quick = False

# %%
import pandas as pd

from hidden_signatures.run import params, pipeline

run = pipeline.load_run(params_file, quick=quick)
layers = pipeline.validate(run)
tokens = pipeline.pair_tokens(run)
store_a, store_b = pipeline.harvest(run, tokens, layers)

# %%
rows = []
for side, store, model in (("A", store_a, run.model_a), ("B", store_b, run.model_b)):
    for layer in store.layers:
        rows.append({"side": side, "model": model, "block": layer, "rows": store.n_tokens,
                     "width": store.d_model, "norm factor": round(store.norm_factor(layer), 5),
                     "store": store.directory.name})
pd.DataFrame(rows)
