"""Tests for distillation: student construction, KL and Jacobian objectives, runs, on tiny random models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

from hidden_signatures.models import distill as ds
from hidden_signatures.models import lm_training as lt

VOCAB = 64


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 4-block Llama of width 32."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 4-block GPT-2 of width 32 (dropout off)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                     eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def tiny_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    """A 4-block GPT-NeoX of width 32."""
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    return GPTNeoXForCausalLM(cfg)


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


def eager(model):
    """`model` switched to eager attention, returned for chaining."""
    ds.ensure_eager(model)
    return model


@pytest.mark.parametrize("layer", [None, 2])
def test_jvp_matches_central_finite_differences(layer):
    model = eager(tiny_llama(dtype=torch.float64)).eval()
    ids = random_tokens(2, 6, seed=0)
    v = ds.random_directions((2, 6, 32), n_dirs=2, generator=torch.Generator().manual_seed(1)).double()
    jvp = ds.embedding_jvp(model, ids, v, layer)

    def f(embeds):
        out = model(inputs_embeds=embeds, output_hidden_states=True)
        return F.log_softmax(out.logits, -1) if layer is None else out.hidden_states[layer]

    with torch.no_grad():
        e = model.get_input_embeddings()(ids).repeat(2, 1, 1)
        h = 1e-5
        fd = (f(e + h * v) - f(e - h * v)) / (2 * h)
    assert jvp.shape == fd.shape
    torch.testing.assert_close(jvp.double(), fd, rtol=1e-3, atol=1e-3 * fd.abs().max().item())
    assert fd.abs().max() > 1e-3  # a non-trivial Jacobian


@pytest.mark.parametrize("build,path", [(tiny_llama, "model.layers"), (tiny_gpt2, "transformer.h"),
                                        (tiny_neox, "gpt_neox.layers")])
def test_student_copies_every_other_block(build, path):
    teacher = build()
    student, kept = ds.make_student(teacher)
    assert kept == [0, 2] and student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4 and len(teacher.get_submodule(path)) == 4
    assert ds.block_list_path(student) == path
    t_blocks, s_blocks = teacher.get_submodule(path), student.get_submodule(path)
    for i, t_idx in enumerate(kept):
        t_state, s_state = t_blocks[t_idx].state_dict(), s_blocks[i].state_dict()
        assert t_state.keys() == s_state.keys()
        assert all(torch.equal(t_state[k], s_state[k]) for k in t_state)
        assert s_blocks[i] is not t_blocks[t_idx]
    teacher_state = teacher.state_dict()
    outside = [k for k in student.state_dict() if not k.startswith(path + ".")]
    assert any("emb" in k or "wte" in k for k in outside)
    assert all(torch.equal(student.state_dict()[k], teacher_state[k]) for k in outside)
    t1, s1 = t_blocks[1].state_dict(), s_blocks[1].state_dict()  # student block 1 is teacher block 2, not 1
    assert any(not torch.equal(t1[k], s1[k]) for k in t1)
    idx = [m.layer_idx for m in s_blocks.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(idx)) == [0, 1]

    ids = random_tokens(2, 8, seed=3)
    with torch.no_grad():
        full = student(ids).logits
        prefix = student(ids[:, :-1], use_cache=True)
        last = student(ids[:, -1:], cache=prefix.cache).logits
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


def test_kl_loss_is_temperature_scaled_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    temp = 2.0
    p_t = torch.softmax(t / temp, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    torch.testing.assert_close(ds.kl_loss(s, t, temp), manual)
    assert ds.kl_loss(t + 5.0, t, temp).abs() < 1e-6 and ds.kl_loss(s, t, temp) > 0


def _one_step_lowers(objective: str, teacher, student, batch_BT) -> dict[str, float]:
    """Loss and logged terms before and after one AdamW step on the same batch and directions."""
    cfg = ds.DistillConfig(n_dirs=2, jac_weight=1.0, alpha=0.5, temperature=2.0)
    step = ds.make_step_fn(teacher, cfg, objective)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.0)
    torch.manual_seed(7)
    loss0, logged0 = step(student, batch_BT)
    loss0.backward()
    opt.step()
    torch.manual_seed(7)
    with torch.no_grad():
        loss1, logged1 = step(student, batch_BT)
    assert loss1.item() < loss0.item(), (objective, loss0.item(), loss1.item())
    return {k: logged1[k] - logged0[k] for k in logged0}


@pytest.mark.parametrize("objective", ds.OBJECTIVES)
def test_one_step_of_each_objective_lowers_its_loss(objective):
    teacher = eager(tiny_llama(seed=0)).eval()
    student, _ = ds.make_student(tiny_llama(seed=1))  # a student that is not a sub-network of the teacher
    eager(student)
    change = _one_step_lowers(objective, teacher, student, random_tokens(4, 12, seed=4))
    assert set(change) == ({"kl", "lm", "jac"} if objective == "kl_jacobian" else {"kl", "lm"})


def test_jacobian_loss_trains_the_student_through_its_jvp():
    teacher = eager(tiny_llama(seed=0)).eval()
    student, _ = ds.make_student(tiny_llama(seed=1))
    eager(student)
    ids = random_tokens(3, 10, seed=5)
    loss0 = ds.jacobian_loss(teacher, student, ids, 2, torch.Generator().manual_seed(0))
    loss0.backward()
    assert student.get_input_embeddings().weight.grad.abs().sum() > 0
    assert student.model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p -= 0.05 * p.grad / p.grad.norm().clamp_min(1e-12)
    loss1 = ds.jacobian_loss(teacher, student, ids, 2, torch.Generator().manual_seed(0))
    assert float(loss1) < float(loss0)
    self_loss = ds.jacobian_loss(teacher, teacher, ids, 2, torch.Generator().manual_seed(0))
    assert float(self_loss) < 1e-10


def test_ensure_eager_switches_attention():
    model = tiny_llama()
    assert model.config._attn_implementation != "eager"
    ds.ensure_eager(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("objective", ds.OBJECTIVES)
def test_distill_saves_a_loadable_student_with_metrics(tmp_path, objective):
    teacher = tiny_llama(seed=0)
    attn = teacher.config._attn_implementation
    data = random_tokens(8, 12, seed=6)
    cfg = ds.DistillConfig(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=2,
                           n_dirs=1, jac_max_seqs=2)
    path = ds.distill(teacher, tiny_tokenizer(), data, cfg, objective, tmp_path)
    assert teacher.training and teacher.config.num_hidden_layers == 4  # teacher mode and depth restored
    assert teacher.config._attn_implementation == attn
    student = AutoModelForCausalLM.from_pretrained(path)
    assert student.config.num_hidden_layers == 2
    meta = lt.io.read_json(path / lt.TRAIN_CONFIG)
    assert meta["info"]["teacher_blocks"] == [0, 2] and meta["info"]["objective"] == objective
    assert meta["metrics"]["peak_rss_mib"] > 0 and meta["metrics"]["mean_step_time_s"] > 0
    assert ("jac" in lt.io.read_json(tmp_path / "log.json")[-1]) == (objective == "kl_jacobian")
    assert ds.distill(teacher, None, data, cfg, objective, tmp_path) == path  # cached

    eager(teacher), eager(student)
    held_out = random_tokens(4, 12, seed=7)
    assert ds.jacobian_agreement(teacher, teacher, held_out, 2, seed=11) == pytest.approx(1.0, abs=1e-5)
    agreement = ds.jacobian_agreement(teacher, student, held_out, 2, seed=11, batch_size=3)
    assert -1.0 < agreement < 0.999


def test_bad_objective_and_config_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="objective='jacobian'"):
        ds.distill(tiny_llama(), None, random_tokens(4, 8, 0), ds.DistillConfig(), "jacobian", tmp_path)
    with pytest.raises(ValueError, match="alpha=1.5"):
        ds.DistillConfig(alpha=1.5)
    with pytest.raises(ValueError, match="jac_layers"):
        ds.DistillConfig(jac_layers=[1])


def test_student_of_a_frozen_teacher_is_trainable():
    teacher = tiny_llama().requires_grad_(False)  # as models.load_model returns it
    student, _ = ds.make_student(teacher)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("build,path", [(tiny_llama, "model.layers"), (tiny_gpt2, "transformer.h")])
def test_student_starts_from_the_named_teacher_blocks(build, path):
    teacher = build()
    student, kept = ds.make_student(teacher, [0, 3])
    assert kept == [0, 3] and student.config.num_hidden_layers == 2
    t_blocks, s_blocks = teacher.get_submodule(path), student.get_submodule(path)
    for i, t_idx in enumerate(kept):
        t_state, s_state = t_blocks[t_idx].state_dict(), s_blocks[i].state_dict()
        assert all(torch.equal(t_state[k], s_state[k]) for k in t_state)
    s_default, _ = ds.make_student(teacher)  # the default start (0, 2) differs in the second block
    assert any(not torch.equal(a, b) for a, b in zip(s_blocks[1].state_dict().values(),
                                                      s_default.get_submodule(path)[1].state_dict().values()))
    with pytest.raises(ValueError, match=r"student_blocks=\[0, 4\]: block 4 is out of range; the teacher has 4 "
                                         r"blocks \(0 to 3\)"):
        ds.make_student(teacher, [0, 4])


@pytest.mark.parametrize("bad", [[], [2, 1], [1, 1], [-1, 2], [True], "0,2", [0.0, 2]])
def test_student_blocks_must_be_increasing_block_indices(bad):
    with pytest.raises(ValueError, match="student_blocks=.*must be None or a non-empty list of increasing"):
        ds.DistillConfig(student_blocks=bad)


def test_student_blocks_enter_the_cache_key_only_when_named():
    """Students cached before the field existed keep their keys; a named start gets its own."""
    default, named = ds.DistillConfig(), ds.DistillConfig(student_blocks=[0, 1])
    before_the_field = {k: v for k, v in dataclasses.asdict(default).items() if k != "student_blocks"}
    assert lt.key_dict(default) == before_the_field  # what keys were hashed from until now
    assert lt.key_dict(named)["student_blocks"] == [0, 1]
    assert ds.distill_key("t", "d", default, "kl") != ds.distill_key("t", "d", named, "kl")


def test_a_named_student_start_is_checked_against_the_teacher_before_any_work():
    from hidden_signatures.run import derived, params
    data = {"name": "p", "model_a": "smollm2-135m", "model_b": "distill-kl:smollm2-135m", "layers": ["last"],
            "distill": {"student_blocks": [0, 29]}}
    run = params.from_dict(data)
    derived.check(run, run.model_b)
    assert derived.shape(run, run.model_b) == (2, 576)
    run = params.from_dict({**data, "distill": {"student_blocks": [0, 30]}})
    with pytest.raises(params.ParamsError, match=r"^distill.student_blocks=\[0, 30\]: block 30 is out of range; "
                                                 r"the teacher has 30 blocks \(0 to 29\)$"):
        derived.check(run, run.model_b)
