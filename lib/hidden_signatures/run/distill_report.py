"""What the KL-distilled and the Jacobian-matched students kept: losses, Jacobian agreement, costs."""

from __future__ import annotations

import torch

from .. import io
from ..analysis import figures
from ..data import corpus
from ..models import lm_training
from ..models import loading as models
from ..models.distill import ensure_eager, jacobian_agreement
from . import derived
from .model_info import model_report
from .params import RunConfig

JVP_SEQS = 4
JVP_TOKENS = 64
JVP_SEED = 12345  # not a training seed: held-out directions


def student_specs(run: RunConfig) -> tuple[str, str]:
    """(teacher spec, student spec) of a teacher-vs-student params file."""
    for teacher, student in ((run.model_a, run.model_b), (run.model_b, run.model_a)):
        parsed = derived.parse(student)
        if parsed and parsed[0].startswith("distill") and parsed[1] == teacher:
            return teacher, student
    raise ValueError(f"{run.name}: not a teacher vs distilled-student pair")


def training_facts(run: RunConfig, spec: str) -> dict:
    """Peak memory, mean step time and steps of a built student, from its train_config.json."""
    saved = io.read_json(lm_training.model_dir(derived.directory(run, spec)) / lm_training.TRAIN_CONFIG)
    metrics, info = saved.get("metrics", {}), saved.get("info", {})
    return {"objective": info.get("objective"), "teacher blocks copied": info.get("teacher_blocks"),
            **{k: v for k, v in metrics.items()}}


def learning_curves(run_kl: RunConfig, run_jac: RunConfig, teacher_ce: float | None = None):
    """Both students' held-out CE and Jacobian agreement against tokens seen (one figure, teacher dotted)."""
    curves = {spec: lm_training.curve(derived.training_log(run, spec))
              for run, spec in ((run_kl, student_specs(run_kl)[1]), (run_jac, student_specs(run_jac)[1]))}
    reference = {"jacobian_agreement": 1.0, **({"heldout_ce": teacher_ce} if teacher_ce is not None else {})}
    return figures.learning_curves(curves, ["heldout_ce", "jacobian_agreement"], reference=reference,
                                   reference_name="teacher", title="Students: held-out CE and Jacobian "
                                   f"agreement against tokens ({derived.CURVE_SEQS} held-out sequences)")


def budgets(run_kl: RunConfig, run_jac: RunConfig) -> list[dict]:
    """Tokens, steps and wall-clock training time of each student, side by side."""
    rows = []
    for run in (run_kl, run_jac):
        spec = student_specs(run)[1]
        facts = training_facts(run, spec)
        kind = derived.parse(spec)[0]
        cfg, seq_len = derived.train_config(run, kind), derived.train_corpus(run, kind).seq_len
        rows.append({"student": spec, "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size * seq_len,
                     "train minutes": round(facts.get("train_seconds", float("nan")) / 60, 1),
                     "seconds per step": round(facts.get("mean_step_time_s", float("nan")), 2)})
    return rows


def evaluate_students(run_kl: RunConfig, run_jac: RunConfig, device: str = "cpu") -> list[dict]:
    """Held-out cross-entropy and Jacobian agreement (cosine of JVPs) of the teacher and both students.

    The cross-entropy is each model's report (00_models measured it and cached it), so only the
    Jacobian agreement is computed here.
    """
    teacher_spec, kl_spec = student_specs(run_kl)
    _, jac_spec = student_specs(run_jac)
    teacher, tok = models.load_model(teacher_spec, device=device, dtype=torch.float32,
                                     attn_implementation="eager")
    jvp_ids = corpus.tokenize_part(run_kl.corpus, tok, "heldout")[:JVP_SEQS, :JVP_TOKENS]
    rows = [{"model": teacher_spec, "blocks": models.num_blocks(teacher),
             "held-out loss": model_report(run_kl, teacher_spec)["held-out loss"], "Jacobian agreement": 1.0}]
    for run, spec in ((run_kl, kl_spec), (run_jac, jac_spec)):
        path = str(lm_training.model_dir(derived.directory(run, spec)))
        student, _ = models.load_model(path, device=device, dtype=torch.float32, attn_implementation="eager")
        ensure_eager(student)
        rows.append({"model": spec, "blocks": models.num_blocks(student),
                     "held-out loss": model_report(run, path)["held-out loss"],
                     "Jacobian agreement": jacobian_agreement(teacher, student, jvp_ids, n_dirs=2, seed=JVP_SEED,
                                                              batch_size=2)})
    return rows
