"""Distil a half-depth student from a teacher: KL (DistilGPT-2 recipe) vs KL + Jacobian matching.

This finishes the original's unfinished study. The student keeps the teacher's width,
embeddings, final norm, LM head and tokenizer, and starts from every other teacher block
(0, 2, 4, ...; `student_blocks` names others). Objective "kl" trains on
alpha * KL(teacher || student at temperature T) * T^2 + (1 - alpha) * LM loss. Objective
"kl_jacobian" adds jac_weight * a Jacobian-matching term: the relative squared error between
teacher and student Jacobian-vector products J v from the input embeddings to the output
log-probabilities, on random directions v (one random unit
vector per position, so every position is perturbed equally). Log-probabilities rather than
logits, because a shift of all logits changes nothing the model predicts. The products are
computed with forward-mode AD (torch.func.jvp), which needs eager attention: SDPA has no
forward-AD rule. torch.func.jvp composes with backward, so the student's gradient flows
through its JVP (torch.autograd.forward_ad does not: HF eager softmax is in place).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import io
from . import lm_training, logit_losses
from .finetune import heldout_loss
from .lm_training import LMTrainConfig, StepFn, is_complete, model_dir, run

OBJECTIVES = ("kl", "kl_jacobian")


@dataclass
class DistillConfig(LMTrainConfig):
    """Training settings of a distillation run: the shared loop's fields plus the objectives' weights."""

    temperature: float = 2.0
    """Softmax temperature of the KL term (the KL is multiplied by T^2, as in DistilGPT-2)."""
    alpha: float = 0.5
    """Weight of the KL term; the LM loss gets 1 - alpha."""
    jac_weight: float = 1.0
    """Weight of the Jacobian-matching term (objective kl_jacobian only)."""
    n_dirs: int = 2
    """Random embedding-space directions per sequence for the Jacobian term."""
    jac_max_seqs: int = 0
    """Use only the first this many sequences of a batch for the Jacobian term (0: all), to bound memory."""
    jac_layers: list[int] | None = None
    """None: match JVPs at the output log-probs; [t, s]: at teacher hidden_states[t] vs student hidden_states[s]."""
    student_blocks: list[int] | None = None
    """Teacher blocks the student starts from, in increasing order; None: every other block (0, 2, 4, ...,
    the DistilGPT-2 recipe). A start closer to the teacher (its first and last blocks) needs fewer steps."""

    KEY_OMITS_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("student_blocks",)
    """Fields added after students were cached: left out of cache keys at their default, so those caches hold."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha}: must be in [0, 1]")
        if self.jac_weight < 0 or self.n_dirs < 1 or self.jac_max_seqs < 0:
            raise ValueError(f"jac_weight={self.jac_weight}, n_dirs={self.n_dirs}, jac_max_seqs="
                             f"{self.jac_max_seqs}: need jac_weight >= 0, n_dirs >= 1, jac_max_seqs >= 0")
        if self.jac_layers is not None and len(self.jac_layers) != 2:
            raise ValueError(f"jac_layers={self.jac_layers}: must be None or [teacher_index, student_index]")
        blocks = self.student_blocks
        if blocks is not None and not (isinstance(blocks, list) and blocks
                                       and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
                                       and blocks[0] >= 0 and all(a < b for a, b in zip(blocks, blocks[1:]))):
            raise ValueError(f"student_blocks={blocks}: must be None or a non-empty list of increasing "
                             f"teacher block indices >= 0")


# ---------------------------------------------------------------- student construction

def block_list_path(model: nn.Module) -> str:
    """Dotted name of the shallowest ModuleList whose length is config.num_hidden_layers."""
    n_layers = model.config.num_hidden_layers
    found = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == n_layers]
    if not found:
        raise ValueError(f"{type(model).__name__}: no ModuleList of length num_hidden_layers={n_layers}")
    return min(found, key=lambda name: name.count("."))


def student_block_ids(n_layers: int, blocks: list[int] | None = None) -> list[int]:
    """The teacher blocks a student of an `n_layers`-block teacher copies: `blocks`, or 0, 2, 4, ..."""
    if blocks is None:
        return list(range(0, n_layers, 2))
    if blocks[-1] >= n_layers:
        raise ValueError(f"student_blocks={blocks}: block {blocks[-1]} is out of range; the teacher has "
                         f"{n_layers} blocks (0 to {n_layers - 1})")
    return list(blocks)


def make_student(teacher: nn.Module, blocks: list[int] | None = None) -> tuple[nn.Module, list[int]]:
    """A copy of `teacher` keeping its blocks `blocks` (default 0, 2, 4, ...); returns (student, copied blocks)."""
    path = block_list_path(teacher)
    kept = student_block_ids(teacher.config.num_hidden_layers, blocks)
    student = copy.deepcopy(teacher)
    parent_name, _, attr = path.rpartition(".")
    parent = student.get_submodule(parent_name) if parent_name else student
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in kept]))
    for new_idx, block in enumerate(getattr(parent, attr)):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):  # indexes the KV cache
                mod.layer_idx = new_idx
    student.config.num_hidden_layers = len(kept)
    if getattr(student.config, "layer_types", None) is not None:
        student.config.layer_types = [student.config.layer_types[i] for i in kept]
    student.requires_grad_(True)  # the teacher may arrive frozen (inference loading); the student trains
    return student, kept


def ensure_eager(model: nn.Module) -> None:
    """Switch `model` to eager attention (forward-mode AD has no rule for SDPA / flash attention)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "eager":
        raise RuntimeError(f"{type(model).__name__}: attention is {impl!r}; the Jacobian objective "
                           "needs attn_implementation='eager' (load the model with it)")


# ---------------------------------------------------------------- objectives

def kl_loss(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(teacher || student) between temperature-T softmaxes, in fp32."""
    n_pos = student_logits_BTV.shape[0] * student_logits_BTV.shape[1]
    return logit_losses.kl_sum(student_logits_BTV, teacher_logits_BTV, temperature) / n_pos * temperature**2


def random_directions(shape_BTD: tuple[int, int, int], n_dirs: int,
                      generator: torch.Generator) -> torch.Tensor:
    """n_dirs random directions per sequence, one unit vector per position: [n_dirs * B, T, D] (CPU, fp32)."""
    B, T, D = shape_BTD
    v_KBTD = torch.randn(n_dirs * B, T, D, generator=generator, dtype=torch.float32)
    return v_KBTD / v_KBTD.norm(dim=-1, keepdim=True)


def embedding_jvp(model: nn.Module, input_ids_BT: torch.Tensor, v_KBTD: torch.Tensor,
                  layer: int | None = None) -> torch.Tensor:
    """J v of the map input embeddings -> output log-probs (layer None) or hidden_states[layer], per direction.

    `v_KBTD` stacks n_dirs directions along the batch axis; returns [n_dirs * B, T, V or D].
    Differentiable w.r.t. the model's parameters unless called under no_grad.
    """
    n_dirs = v_KBTD.shape[0] // input_ids_BT.shape[0]
    embeds = model.get_input_embeddings()(input_ids_BT).repeat(n_dirs, 1, 1)
    v = v_KBTD.to(device=embeds.device, dtype=embeds.dtype)

    def forward(embeds_KBTD: torch.Tensor) -> torch.Tensor:
        out = model(inputs_embeds=embeds_KBTD, output_hidden_states=layer is not None, use_cache=False)
        return out.logits if layer is None else out.hidden_states[layer]

    primal, tangent = torch.func.jvp(forward, (embeds,), (v,))
    if layer is not None:
        return tangent.float()
    probs = torch.softmax(primal.float(), dim=-1)
    tangent = tangent.float()
    return tangent - (probs * tangent).sum(-1, keepdim=True)  # d log_softmax(z) = dz - <p, dz>


def jacobian_loss(teacher: nn.Module, student: nn.Module, input_ids_BT: torch.Tensor, n_dirs: int,
                  generator: torch.Generator, layer: list[int] | None = None) -> torch.Tensor:
    """Relative squared error sum|J_s v - J_t v|^2 / sum|J_t v|^2 over n_dirs random directions (0 = perfect).

    `layer` None compares output log-probs; [t, s] compares teacher hidden_states[t] with student
    hidden_states[s]. The teacher's JVP is taken without grad.
    """
    t_layer, s_layer = (None, None) if layer is None else layer
    v_KBTD = random_directions((*input_ids_BT.shape, teacher.get_input_embeddings().embedding_dim),
                               n_dirs, generator)
    with torch.no_grad():
        jt = embedding_jvp(teacher, input_ids_BT, v_KBTD, t_layer)
    js = embedding_jvp(student, input_ids_BT, v_KBTD, s_layer)
    return (js - jt).pow(2).sum() / jt.pow(2).sum().clamp_min(1e-12)


def make_step_fn(teacher: nn.Module, cfg: DistillConfig, objective: str) -> StepFn:
    """The training step of `objective`: alpha * KL + (1 - alpha) * LM [+ jac_weight * Jacobian term]."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: accepted {OBJECTIVES}")

    def step(student: nn.Module, batch_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch_BT).logits
        student_logits = student(input_ids=batch_BT).logits
        # kl_loss and lm_loss, a chunk of sequences at a time (their gradients exactly: logit_losses)
        loss, kl, lm = logit_losses.distill_loss(student_logits, teacher_logits, batch_BT, cfg.temperature,
                                                 cfg.alpha)
        logged = {"kl": float(kl.detach()), "lm": float(lm.detach())}
        if objective == "kl_jacobian":
            # drawn from the loop's per-step seeded RNG, so a resumed run sees the same directions
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
            jac_ids = batch_BT[:cfg.jac_max_seqs] if cfg.jac_max_seqs else batch_BT
            jac = jacobian_loss(teacher, student, jac_ids, cfg.n_dirs, gen, cfg.jac_layers)
            loss = loss + cfg.jac_weight * jac
            logged["jac"] = float(jac.detach())
        return loss, logged

    return step


# ---------------------------------------------------------------- runs

def distill_key(teacher_spec: str, data_fingerprint: str, cfg: DistillConfig, objective: str) -> str:
    """A short hash naming a distillation run by teacher, data, config and objective."""
    return io.config_hash({"kind": "distill", "teacher": teacher_spec, "data": data_fingerprint,
                           "objective": objective, "config": lm_training.key_dict(cfg)})


CURVE_JVP_SEQS, CURVE_JVP_TOKENS, CURVE_JVP_SEED = 2, 64, 12345  # held-out directions, never trained on


def distill(teacher: nn.Module, tokenizer: Any, train_NT: torch.Tensor, cfg: DistillConfig,
            objective: str, out_dir: str | os.PathLike, info: dict[str, Any] | None = None,
            heldout_NT: torch.Tensor | None = None) -> Path:
    """Distil a half-depth student with `objective`; return its saved HF directory (cached when complete).

    The directory's train_config.json records the copied teacher blocks, peak RSS and mean step time.
    The teacher runs in eval mode and, for kl_jacobian, eager attention; both are restored afterwards.
    With `heldout_NT` and cfg.eval_every, the log holds the learning curve: held-out cross-entropy
    and Jacobian agreement against tokens seen.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: accepted {OBJECTIVES}")
    if is_complete(out_dir):
        return model_dir(out_dir)
    student, kept = make_student(teacher, cfg.student_blocks)
    was_training, attn = teacher.training, getattr(teacher.config, "_attn_implementation", None)
    if objective == "kl_jacobian":
        ensure_eager(teacher)
        ensure_eager(student)
    teacher.eval()
    try:
        run_info = {"objective": objective, "teacher_blocks": kept,
                    "teacher_layers": teacher.config.num_hidden_layers, **(info or {})}
        eval_fn = None if heldout_NT is None else curve_fn(teacher, heldout_NT, cfg)
        return run(student, make_step_fn(teacher, cfg, objective), train_NT, cfg, out_dir,
                   desc=f"distill-{objective}", tokenizer=tokenizer, info=run_info, eval_fn=eval_fn)
    finally:
        teacher.train(was_training)
        if attn not in (None, "eager") and hasattr(teacher, "set_attn_implementation"):
            teacher.set_attn_implementation(attn)


def curve_fn(teacher: nn.Module, heldout_NT: torch.Tensor, cfg: DistillConfig):
    """The learning curve's held-out numbers of a student: cross-entropy and Jacobian agreement."""
    jvp_ids = heldout_NT[:CURVE_JVP_SEQS, :CURVE_JVP_TOKENS]

    def numbers(student: nn.Module) -> dict[str, float]:
        ce = heldout_loss(student, heldout_NT, autocast_dtype=cfg.autocast_dtype)
        with eager_attention(teacher, student):
            agreement = jacobian_agreement(teacher, student, jvp_ids, n_dirs=2, seed=CURVE_JVP_SEED, batch_size=2)
        return {"heldout_ce": ce, "jacobian_agreement": agreement}
    return numbers


@contextlib.contextmanager
def eager_attention(*models: nn.Module):
    """Eager attention on `models` for the block (forward-mode AD needs it), their own restored after."""
    saved = [getattr(m.config, "_attn_implementation", None) for m in models]
    for m in models:
        ensure_eager(m)
    try:
        yield
    finally:
        for m, impl in zip(models, saved):
            if impl not in (None, "eager") and hasattr(m, "set_attn_implementation"):
                m.set_attn_implementation(impl)


@torch.no_grad()
def jacobian_agreement(teacher: nn.Module, student: nn.Module, input_ids_NT: torch.Tensor, n_dirs: int,
                       seed: int, batch_size: int = 8, layer: list[int] | None = None,
                       autocast_dtype: str = "float32") -> float:
    """Mean cosine between teacher and student JVPs over sequences, positions and fresh random directions.

    Pass a `seed` not used in training so the directions are held out. Needs eager attention.
    """
    t_layer, s_layer = (None, None) if layer is None else layer
    device_t = next(teacher.parameters()).device
    dtype = lm_training.autocast_dtype(autocast_dtype, device_t)
    device_s = next(student.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    modes = teacher.training, student.training
    teacher.eval(), student.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, input_ids_NT.shape[0], batch_size):
            ids_BT = input_ids_NT[start:start + batch_size]
            v_KBTD = random_directions((*ids_BT.shape, teacher.get_input_embeddings().embedding_dim), n_dirs, gen)
            with torch.autocast(device_t.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                jt = embedding_jvp(teacher, ids_BT.to(device_t), v_KBTD, t_layer)
                js = embedding_jvp(student, ids_BT.to(device_s), v_KBTD, s_layer).to(device_t)
            cos = F.cosine_similarity(js, jt, dim=-1)
            total += float(cos.sum())
            count += cos.numel()
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    return total / count
