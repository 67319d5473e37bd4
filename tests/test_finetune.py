"""Tests for the shared LM training loop (lm_training) and fine-tuning, on tiny random Llama models."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hidden_signatures.models import lm_training as lt
from hidden_signatures.models.finetune import finetune, finetune_key, heldout_loss, lm_step

VOCAB = 64


def tiny_llama(seed: int = 0, dropout: float = 0.0) -> LlamaForCausalLM:
    """A 4-block Llama of width 32; attention dropout exercises the per-step RNG."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      attention_dropout=dropout, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(cfg)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB tokens named <bos>, <unk>, t2 ... t63."""
    vocab = {"<bos>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")


def random_tokens(n: int, t: int, seed: int) -> torch.Tensor:
    """Random token ids [n, t] with BOS at position 0."""
    ids = torch.randint(2, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0
    return ids


def repetitive_tokens(n: int, t: int, seed: int) -> torch.Tensor:
    """A cyclic corpus (t2 t3 ... t9 t2 ...) from random offsets: easy to learn, BOS at position 0."""
    offsets = torch.randint(0, 8, (n, 1), generator=torch.Generator().manual_seed(seed))
    ids = 2 + (offsets + torch.arange(t)) % 8
    ids[:, 0] = 0
    return ids


def small_cfg(**overrides) -> lt.LMTrainConfig:
    """A tiny but complete training config."""
    base = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=1.0, seed=3,
                checkpoint_every=3, log_every=2)
    return lt.LMTrainConfig(**{**base, **overrides})


def test_resume_is_bit_for_bit_equal_to_uninterrupted(tmp_path):
    data = random_tokens(12, 10, seed=1)  # 3 batches per epoch: the run crosses an epoch boundary
    cfg = small_cfg()
    straight = tiny_llama(dropout=0.2)
    lt.run(straight, lm_step, data, cfg, tmp_path / "straight")

    calls = {"n": 0}

    def crashing_step(model, batch_BT):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return lm_step(model, batch_BT)

    with pytest.raises(RuntimeError, match="simulated crash"):
        lt.run(tiny_llama(dropout=0.2), crashing_step, data, cfg, tmp_path / "resumed")
    assert lt.latest_checkpoint(tmp_path / "resumed").name == "step_000003"
    assert not lt.is_complete(tmp_path / "resumed")

    resumed = tiny_llama(seed=99, dropout=0.2)  # other init: the weights must come from the checkpoint
    lt.run(resumed, lm_step, data, cfg, tmp_path / "resumed")
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name
    meta = lt.io.read_json(lt.model_dir(tmp_path / "resumed") / lt.TRAIN_CONFIG)
    assert meta["metrics"]["resumed_from_step"] == 3
    logs = [lt.io.read_json(tmp_path / d / "log.json") for d in ("straight", "resumed")]
    assert [r["step"] for r in logs[1]] == [2, 4, 6]
    assert logs[0][-1]["loss"] == logs[1][-1]["loss"]
    assert not (tmp_path / "resumed" / lt.CHECKPOINT_DIR).exists()


def test_resume_refuses_a_different_config(tmp_path):
    data = random_tokens(8, 8, seed=1)
    with pytest.raises(ValueError, match="non-finite"):
        lt.run(tiny_llama(), _nan_at(4), data, small_cfg(checkpoint_every=2), tmp_path)
    with pytest.raises(ValueError, match="different training config"):
        lt.run(tiny_llama(), lm_step, data, small_cfg(checkpoint_every=2, lr=1e-3), tmp_path)


def _nan_at(bad_call: int):
    """An LM step function whose loss turns NaN on its `bad_call`-th call."""
    calls = {"n": 0}

    def step(model, batch_BT):
        calls["n"] += 1
        loss, logged = lm_step(model, batch_BT)
        return (loss * float("nan") if calls["n"] == bad_call else loss), logged

    return step


def test_nan_loss_names_the_step_and_keeps_last_checkpoint(tmp_path):
    data = random_tokens(8, 8, seed=2)
    model = tiny_llama()
    with pytest.raises(ValueError, match="at step 5"):
        lt.run(model, _nan_at(5), data, small_cfg(steps=8, checkpoint_every=2), tmp_path)
    ckpt = lt.latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_000004"
    saved = lt.io.load_tensors(ckpt / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not lt.is_complete(tmp_path)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = small_cfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lt.lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    cfg = small_cfg(batch_size=4, seed=5)
    epoch0 = torch.cat([lt.batch_indices(s, 12, cfg) for s in range(3)])
    epoch1 = torch.cat([lt.batch_indices(s, 12, cfg) for s in range(3, 6)])
    assert sorted(epoch0.tolist()) == list(range(12)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0, torch.cat([lt.batch_indices(s, 12, cfg) for s in range(3)]))
    other = torch.cat([lt.batch_indices(s, 12, small_cfg(batch_size=4, seed=6)) for s in range(3)])
    assert not torch.equal(epoch0, other)
    with pytest.raises(ValueError, match="n_seq=3"):
        lt.batch_indices(0, 3, cfg)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=0.0), dict(warmup_steps=7), dict(autocast_dtype="fp8")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        small_cfg(**bad)


def test_finetune_lowers_heldout_loss_and_saves_a_loadable_model(tmp_path):
    base = tiny_llama()
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    tokenizer = tiny_tokenizer()
    train, heldout = repetitive_tokens(32, 16, seed=0), repetitive_tokens(8, 16, seed=1)
    cfg = small_cfg(steps=30, batch_size=8, lr=1e-2, warmup_steps=3, checkpoint_every=10, log_every=5)
    before = heldout_loss(base, heldout, batch_size=4)
    path = finetune(base, tokenizer, train, cfg, tmp_path)
    assert lt.is_complete(tmp_path)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_weights.items())  # base untouched

    tuned = AutoModelForCausalLM.from_pretrained(path)
    after = heldout_loss(tuned, heldout, batch_size=4)
    assert before > math.log(VOCAB) - 1.0 and after < 0.5 * before
    assert AutoTokenizer.from_pretrained(path)("t2 t3").input_ids == [2, 3]
    meta = lt.io.read_json(path / lt.TRAIN_CONFIG)
    assert meta["config"]["steps"] == 30 and meta["metrics"]["mean_step_time_s"] > 0
    assert (tmp_path / "log.csv").read_text().startswith("step,")

    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert finetune(base, tokenizer, train, cfg, tmp_path) == path  # cached: no retraining
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_finetune_key_depends_on_every_input():
    cfg = small_cfg()
    key = finetune_key("smollm2-135m", "abc", cfg)
    assert key == finetune_key("smollm2-135m", "abc", small_cfg())
    assert len({key, finetune_key("gpt2", "abc", cfg), finetune_key("smollm2-135m", "abd", cfg),
                finetune_key("smollm2-135m", "abc", small_cfg(lr=1e-4))}) == 4
