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
# # 01 · Data: the text both models read
#
# The crosscoder sees the same text through two models. This notebook loads the corpus named
# in the params file, splits it into parts by a hash of each document (the crosscoder never
# sees the text used to fine-tune or distill a model), and tokenises the crosscoder part for
# both models. Pairs whose tokenizers differ keep only positions where both tokenizers end
# a token at the same character.

# %% tags=["parameters"]
params_file = "params/smollm2-same.yaml"
quick = False

# %%
import pandas as pd

from hidden_signatures.data import corpus
from hidden_signatures.run import params, pipeline

run = pipeline.load_run(params_file, quick=quick)
layers = pipeline.validate(run)
pd.DataFrame([{"label": r.label, "block in A": r.a, "block in B": r.b} for r in layers.values()])

# %% [markdown]
# ## The corpus and its parts

# %%
docs = corpus.load_documents(run.corpus)
parts = {p: corpus.split_text(docs, p) for p in ("crosscoder", "finetune", "heldout")}
pd.DataFrame([{"part": p, "documents": sum(corpus.part_of(d) == p for d in docs), "characters": len(t)}
              for p, t in parts.items()])

# %% [markdown]
# ## Token sequences per model

# %%
tokens = pipeline.pair_tokens(run)
summary = {
    "model A": pipeline.display_name(run.model_a), "model B": pipeline.display_name(run.model_b),
    "sequences A x length": tuple(tokens.ids_a.shape), "sequences B x length": tuple(tokens.ids_b.shape),
    "paired positions": tokens.n_pairs, "same tokenizer": tokens.same_tokenizer,
    "aligned fraction": round(tokens.aligned_fraction, 4),
}
pd.Series(summary, dtype=object)

# %%
tok_a = pipeline.load_tokenizer(run.model_a)
print(repr(tok_a.decode(tokens.ids_a[0, :80])))
