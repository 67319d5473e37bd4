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
# # 00 · Models: the pair, and any model this project makes itself
#
# A params file names two models: packaged offline models (converted once from GGUF to a plain
# safetensors directory), local directories, hub ids, or models made here from a base:
# `finetune:<base>` (fine-tuned on the corpus's `finetune` part, which the crosscoder never
# sees) and `distill-kl:<base>` / `distill-jacobian:<base>` (half-depth students). Made models
# are trained once and cached; this notebook builds them and reports their held-out loss.

# %% tags=["parameters"]
params_file = "params/smollm2-same.yaml"
quick = False

# %%
import pandas as pd

from hidden_signatures.models import loading as models
from hidden_signatures.run import derived, params, pipeline

raw = params.load(params_file, quick=quick)
pipeline.validate(raw)
run = pipeline.load_run(params_file, quick=quick, build_models=True)

# %% [markdown]
# ## Held-out next-token loss
# Cross-entropy on the corpus's `heldout` part (seen by no training here), for each model and,
# for a made model, its base.

# %%
rows = []
for side, spec, built in (("A", raw.model_a, run.model_a), ("B", raw.model_b, run.model_b)):
    base = derived.parse(spec)[1] if derived.is_derived(spec) else None
    for name, source in ((spec, built), *(((f"{base} (base)", base),) if base else ())):
        rows.append({"side": side, "model": name, **pipeline.model_report(run, source)})
pd.DataFrame(rows)

# %% [markdown]
# ## Did the fine-tune change something?
# A fine-tune on another kind of text than the crosscoder's (params `finetune.corpus`): held-out
# cross-entropy of base and fine-tuned model on the fine-tune's own text and on the crosscoder's.

# %%
pd.DataFrame([r for r in (derived.domain_report(raw, run, f) for f in ("model_a", "model_b")) if r])

# %% [markdown]
# ## Training log of made models

# %%
for spec in {raw.model_a, raw.model_b}:
    if derived.is_derived(spec):
        print(spec)
        display(pd.DataFrame(derived.training_log(raw, spec)).tail(5))
