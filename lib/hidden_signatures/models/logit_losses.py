"""The students' and the fine-tune's losses over the vocabulary, taken a few sequences at a time.

A step's logits are [B, T, V] with V 49,152 (SmolLM2) or 262,144 (Gemma-3): at 8 x 256 tokens
each fp32 copy of them is 400 MB, and the losses made about a dozen such copies a step (casts,
temperature, two log-softmaxes, their backward). Blocks that large fault in as fresh pages
every step, whatever the allocator keeps (`allocator.py`), so on the AMX Xeon a KL student step
spent more time in the kernel than in its matmuls. Here the same operations run on one chunk of
sequences at a time, each chunk's gradient with respect to the logits taken at once with autograd
and kept for the backward pass: the copies shrink to chunk size and are reused.

The gradients equal the whole-batch ones bit for bit on CPU (the operations are row-wise and
their scalar factors are the same; tested), so students and fine-tunes train exactly as before;
only the loss values logged differ in their last bits (a sum taken chunk by chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (sequences x positions x vocabulary; at least one sequence): 64 MB in fp32."""


def chunk_sequences(logits_BTV: torch.Tensor, budget: int | None = None) -> int:
    """Sequences per chunk: as many as fit in `budget` logits (default CHUNK_ELEMENTS), at least one."""
    _, T, V = logits_BTV.shape
    return max(1, (CHUNK_ELEMENTS if budget is None else budget) // (T * V))


def kl_sum(student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) between temperature-T softmaxes, in fp32."""
    log_ps = F.log_softmax(student_BTV.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_BTV.float() / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")


def lm_sum(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (fp32) of positions 0..T-2 against tokens 1..T-1."""
    logits = logits_BTV[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids_BT[:, 1:].reshape(-1), reduction="sum")


class _ChunkedLoss(torch.autograd.Function):
    """alpha * T^2 * mean KL + (1 - alpha) * mean LM loss (teacher given), or the mean LM loss alone."""

    @staticmethod
    def forward(ctx, logits_BTV, teacher_BTV, input_ids_BT, temperature, alpha, chunk):
        B, T, _ = logits_BTV.shape
        n_pos, n_tok = B * T, B * (T - 1)
        grad_BTV = torch.empty_like(logits_BTV)
        kl_total = logits_BTV.new_zeros((), dtype=torch.float32)
        lm_total = logits_BTV.new_zeros((), dtype=torch.float32)
        with torch.enable_grad():
            for start in range(0, B, chunk):
                rows = slice(start, start + chunk)
                z = logits_BTV[rows].detach().requires_grad_(True)
                lm = lm_sum(z, input_ids_BT[rows])
                if teacher_BTV is None:
                    part = lm / n_tok
                else:
                    kl = kl_sum(z, teacher_BTV[rows], temperature)
                    part = alpha * (kl / n_pos * temperature**2) + (1 - alpha) * (lm / n_tok)
                    kl_total += kl.detach()
                grad_BTV[rows], = torch.autograd.grad(part, z)
                lm_total += lm.detach()
        ctx.save_for_backward(grad_BTV)
        lm_mean = lm_total / n_tok
        if teacher_BTV is None:
            return lm_mean, lm_mean.new_zeros(()), lm_mean.clone()  # three distinct outputs
        kl_mean = kl_total / n_pos * temperature**2
        return alpha * kl_mean + (1 - alpha) * lm_mean, kl_mean, lm_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_lm):
        grad_BTV, = ctx.saved_tensors
        scaled = grad_BTV if float(grad_loss) == 1.0 else grad_BTV * grad_loss.to(grad_BTV.dtype)
        return scaled, None, None, None, None, None


def distill_loss(student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, input_ids_BT: torch.Tensor,
                 temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha * KL + (1 - alpha) * LM, KL, LM): KL(teacher || student) at temperature T times T^2,
    averaged over positions, and the mean next-token cross entropy, as distill.kl_loss and
    finetune.lm_loss define them; differentiable with respect to the student's logits only."""
    if student_BTV.shape != teacher_BTV.shape:
        raise ValueError(f"student logits {tuple(student_BTV.shape)} and teacher logits "
                         f"{tuple(teacher_BTV.shape)} differ in shape: the models need one vocabulary")
    return _ChunkedLoss.apply(student_BTV, teacher_BTV.detach(), input_ids_BT, temperature, alpha,
                              chunk_sequences(student_BTV))


def lm_loss(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (fp32), as finetune.lm_loss defines it, for training steps."""
    loss, _, _ = _ChunkedLoss.apply(logits_BTV, None, input_ids_BT, 1.0, 0.0, chunk_sequences(logits_BTV))
    return loss
