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
# # 06 · KL-distilled vs Jacobian-matched students: what did each keep?
#
# The original repository shipped a Jacobian-matching distillation pipeline that never ran
# ("memory constraints prevented a complete analysis"). Here it runs to the end, at SmolLM2
# scale on a CPU. Two students of SmolLM2-135M, each with 15 blocks initialised from teacher blocks
# 0-5 and 21-29 (the params' `student_blocks`; without it every other block, the DistilBERT /
# DistilGPT-2 recipe, which starts twice as far from the teacher and needed 160 steps to reach what
# this start reaches in 60), trained on the same data, for the same steps, with the same seed and optimizer:
# - **KL**: temperature-scaled KL to the teacher's next-token distribution + LM loss;
# - **KL + Jacobian**: additionally matching the teacher's Jacobian-vector products from the
#   input embeddings to the output log-probabilities on random directions (forward-mode AD).
#
# Does matching the Jacobian, not only the outputs, make the student keep more of the teacher's
# features, and at which depth? The crosscoders of teacher vs each student answer it.

# %% tags=["parameters"]
kl_params = "params/distill-kl.yaml"
jacobian_params = "params/distill-jacobian.yaml"
quick = False

# %%
import pandas as pd
from IPython.display import display

from hidden_signatures import io
from hidden_signatures.analysis import figures, metrics, summary
from hidden_signatures.models import lm_training
from hidden_signatures.models import loading as models
from hidden_signatures.run import derived, distill_report, params, pipeline

run_kl = params.load(kl_params, quick=quick)
run_jac = params.load(jacobian_params, quick=quick)
_, kl_spec = distill_report.student_specs(run_kl)
_, jac_spec = distill_report.student_specs(run_jac)

# %% [markdown]
# ## Training: curves, memory and step time

# %%
logs = {spec: lm_training.step_rows(derived.training_log(run, spec)) for run, spec in ((run_kl, kl_spec), (run_jac, jac_spec))}
for spec, log in logs.items():
    display(figures.training_curves(log, [k for k in ("loss", "kl", "lm", "jac") if k in log[-1]],
                                    title=spec))
pd.DataFrame([{"student": spec, **distill_report.training_facts(run, spec)}
              for run, spec in ((run_kl, kl_spec), (run_jac, jac_spec))])

# %% [markdown]
# ## Held-out cross-entropy and Jacobian agreement
# Cross-entropy on the corpus's held-out part (each model's report from 00_models). Agreement:
# mean cosine between the teacher's and the student's Jacobian-vector products on held-out
# sequences and random directions never used in training.

# %%
students = pd.DataFrame(distill_report.evaluate_students(run_kl, run_jac))
students

# %% [markdown]
# ## Learning curves and budgets
# Both students see the same tokens (same steps, batch and order); the Jacobian term makes each
# step dearer, so its wall-clock time is longer. The curves show whether each had stopped improving
# (`--quick`'s students, of a step or two, draw none: their panels stay empty).

# %%
distill_report.learning_curves(run_kl, run_jac, teacher_ce=float(students["held-out loss"].iloc[0]))

# %%
pd.DataFrame(distill_report.budgets(run_kl, run_jac))

# %% [markdown]
# ## Crosscoders: teacher vs each student, layer by layer

# %%
rows, hists = [], {}
for run in (run_kl, run_jac):
    for label in ("first", "middle", "last"):
        path = pipeline.layer_dir(run, label) / pipeline.METRICS_FILE
        if path.exists():
            m = io.read_json(path)
            rows.append({"pair": run.name, "layer": label, "blocks (teacher, student)": (m["block_a"], m["block_b"]),
                         "sharedness": m["sharedness"], "alignment": m["alignment"],
                         "alignment null": m.get("alignment_null_permutation"), "CKA": m["cka"],
                         "EV teacher": m["explained_variance"]["A"], "EV student": m["explained_variance"]["B"]})
            strengths = io.load_tensors(pipeline.layer_dir(run, label) / "strengths.safetensors")
            live = strengths["fire_rate"] >= run.analysis.min_fire_rate
            hists[f"{run.name} · {label}"] = strengths["model_strength"][live].numpy()
comparison = pd.DataFrame(rows)
comparison

# %%
if hists:
    display(figures.relative_norm_histograms(hists, name_a="teacher", name_b="student", cols=3))

# %% [markdown]
# ## The verdict, beside the seed floor
# Each student's crosscoder numbers against the teacher, layer by layer, and whether the KL and the
# Jacobian student differ by more than twice the seed spread (their own seeds at the middle layer,
# never below the run's spread pooled over every layer with seeds, since two seeds can agree by
# chance; elsewhere the largest spread of the whole run).

# %%
summary.compare_pairs(summary.collect(pipeline.results_root()), run_kl.name, run_jac.name)

# %%
kl_vs_jac = pipeline.results_root() / "distill-kl-vs-jacobian" / "last" / pipeline.METRICS_FILE
if kl_vs_jac.exists():
    m = io.read_json(kl_vs_jac)
    print(f"KL student vs Jacobian student, last block: sharedness {m['sharedness']:.3f}, "
          f"alignment {m['alignment']:.3f}, CKA {m['cka']:.3f}")
