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
# # 99 · Summary: every pair and layer, beside the paper
#
# One row per pair, layer and crosscoder architecture found under `results/`. Where a layer was
# trained with several seeds, the number is their mean and ± its spread (standard deviation):
# the seed-noise floor a difference between pairs must clear. Beside alignment, its permutation
# null (the same decoders with B's rows shuffled). Where a pair stands for one of the paper's
# relationships, the paper's Figure 8 numbers sit beside ours. The `precision` column says whether
# the numbers were computed in bf16 or fp32 (chosen by the hardware, see the README's Speed section).
# Written to `figures/summary/`.

# %% tags=["parameters"]
quick = False

# %%
import pandas as pd

from hidden_signatures.analysis import summary
from hidden_signatures.run import pipeline

frame = summary.collect(pipeline.results_root())
written = summary.write(frame, pipeline.figures_root() / "summary")
frame

# %%
print(summary.markdown_table(frame))
print(summary.precision_note(pipeline.results_root()))

# %% [markdown]
# ## Seed floor
# The largest spread across seeds, and the pairs whose middle-layer numbers differ by less than
# twice that spread (they cannot be told apart by this run).

# %%
print("seed floor:", summary.seed_floor(frame))
for line in summary.indistinguishable(frame):
    print(line)
