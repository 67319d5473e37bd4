"""The chunked vocabulary losses give the whole-batch losses' gradients bit for bit (so students and
fine-tunes train exactly as before), their values to float tolerance, on tiny random Llamas."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hidden_signatures.models import distill, finetune, logit_losses

VOCAB, SEQS, LEN = 300, 5, 12


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(cfg)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (SEQS, LEN), generator=torch.Generator().manual_seed(3))


def grads_of(model: torch.nn.Module, loss_fn, autocast: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the losses loss_fn returns, every parameter's gradient of the first) after one backward pass."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        values = loss_fn(model)
    values[0].backward()
    return [v.detach() for v in values], [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("per_chunk", [1, 2, SEQS])
def test_distill_loss_has_the_whole_batch_gradients_bit_for_bit(monkeypatch, autocast, per_chunk):
    monkeypatch.setattr(logit_losses, "CHUNK_ELEMENTS", per_chunk * LEN * VOCAB)  # 2: chunks of 2, 2, 1
    teacher, student, ids_BT = tiny_llama(0).eval(), tiny_llama(1), batch()
    temperature, alpha = 1.7, 0.3  # not powers of two: a reordered scalar factor changes bits
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        teacher_BTV = teacher(input_ids=ids_BT).logits

    def whole(model):
        logits = model(input_ids=ids_BT).logits
        kl, lm = distill.kl_loss(logits, teacher_BTV, temperature), finetune.lm_loss(logits, ids_BT)
        return alpha * kl + (1 - alpha) * lm, kl, lm

    def chunked(model):
        logits = model(input_ids=ids_BT).logits
        assert logit_losses.chunk_sequences(logits) == per_chunk
        return logit_losses.distill_loss(logits, teacher_BTV, ids_BT, temperature, alpha)

    (w_values, w_grads), (c_values, c_grads) = grads_of(student, whole, autocast), grads_of(student, chunked, autocast)
    for w, c in zip(w_values, c_values):
        torch.testing.assert_close(c, w, rtol=1e-6, atol=0)
    assert all(torch.equal(c, w) for c, w in zip(c_grads, w_grads))
    assert any(g.abs().sum() > 0 for g in c_grads)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lm_loss_has_the_whole_batch_gradients_bit_for_bit(monkeypatch, autocast):
    monkeypatch.setattr(logit_losses, "CHUNK_ELEMENTS", 2 * LEN * VOCAB)
    model, ids_BT = tiny_llama(1), batch()
    w_values, w_grads = grads_of(model, lambda m: (finetune.lm_loss(m(input_ids=ids_BT).logits, ids_BT),), autocast)
    c_values, c_grads = grads_of(model, lambda m: finetune.lm_step(m, ids_BT)[:1], autocast)
    torch.testing.assert_close(c_values[0], w_values[0], rtol=1e-6, atol=0)
    assert all(torch.equal(c, w) for c, w in zip(c_grads, w_grads))


def test_a_scaled_loss_scales_the_gradient(monkeypatch):
    """The loss inside a larger objective (a weight, another term): its gradient is scaled, not ignored."""
    monkeypatch.setattr(logit_losses, "CHUNK_ELEMENTS", 2 * LEN * VOCAB)
    model, ids_BT = tiny_llama(1), batch()
    _, once = grads_of(model, lambda m: (logit_losses.lm_loss(m(input_ids=ids_BT).logits, ids_BT),), False)
    _, thrice = grads_of(model, lambda m: (3.0 * logit_losses.lm_loss(m(input_ids=ids_BT).logits, ids_BT),), False)
    for a, b in zip(once, thrice):
        torch.testing.assert_close(b, 3.0 * a, rtol=1e-5, atol=1e-7)


def test_teacher_logits_of_another_vocabulary_are_refused():
    student_BTV, teacher_BTV = torch.randn(2, 4, 10, requires_grad=True), torch.randn(2, 4, 12)
    with pytest.raises(ValueError, match=r"student logits \(2, 4, 10\) and teacher logits \(2, 4, 12\)"):
        logit_losses.distill_loss(student_BTV, teacher_BTV, torch.zeros(2, 4, dtype=torch.long), 2.0, 0.5)


def test_chunks_hold_as_many_sequences_as_fit_and_at_least_one():
    logits = torch.empty(8, 256, 49_152)
    assert logit_losses.chunk_sequences(logits) == 1  # 12.6M logits a sequence: one per chunk
    assert logit_losses.chunk_sequences(logits, budget=3 * 256 * 49_152 + 5) == 3
    assert logit_losses.chunk_sequences(logits, budget=10) == 1
