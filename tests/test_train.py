"""Tests for train.py on real (tiny) paired activation stores: schedules, batches, exact resume, failures."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import save_tiny_model

from hidden_signatures import io
from hidden_signatures.crosscoders import convergence, crosscoder
from hidden_signatures.crosscoders import evaluate as evaluate_mod
from hidden_signatures.crosscoders.evaluate import explained_variance
from hidden_signatures.harvest import activations
from hidden_signatures.crosscoders import train as tr
from hidden_signatures.crosscoders.crosscoder import CrosscoderConfig
from hidden_signatures.crosscoders.train_config import TrainConfig

BATCH, STEPS, H = 32, 40, 64


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer) -> activations.PairedActivations:
    """Llama (d 32) vs GPT-2 (d 24) activations on the same 24 sequences of 16 tokens."""
    root = tmp_path_factory.mktemp("train-data")
    dir_a = save_tiny_model(root / "a", "llama", hidden=32, seed=1, tokenizer=tiny_tokenizer)
    dir_b = save_tiny_model(root / "b", "gpt2", hidden=24, seed=2, tokenizer=tiny_tokenizer)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, len(tiny_tokenizer), (24, 16), generator=gen)
    ids[:, 0] = tiny_tokenizer.bos_token_id
    store_a = activations.harvest(str(dir_a), ids, [2], root=root / "stores")
    store_b = activations.harvest(str(dir_b), ids, [1], root=root / "stores")
    return activations.PairedActivations(store_a, store_b, layer_a=2, layer_b=1, eval_fraction=0.1)


class Faulty:
    """PairedActivations seen through a fault injector: `on_get(step)` may raise or spoil a training batch."""

    def __init__(self, data, on_get):
        self._data, self._on_get, self.calls = data, on_get, 0

    def train_batch(self, positions):
        x_a, x_b = self._data.train_batch(positions)
        out = self._on_get(self.calls, x_a, x_b)
        self.calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self._data, name)


def make_cfg(**overrides) -> TrainConfig:
    base = dict(tokens=BATCH * STEPS, batch_size=BATCH, lr=1e-2, l1_warmup_frac=0.1, lr_decay_frac=0.2,
                checkpoint_every=10, log_every=5, seed=7)
    return TrainConfig(**dict(base, **overrides))


def fresh_model(data, seed: int = 0) -> crosscoder.Crosscoder:
    return crosscoder.build(CrosscoderConfig(d_a=data.d_a, d_b=data.d_b, dict_size=H), seed)


def assert_same_weights(dir_1, dir_2) -> None:
    m1, m2 = crosscoder.load(dir_1), crosscoder.load(dir_2)
    for name in crosscoder.PARAM_NAMES:
        assert torch.equal(getattr(m1, name), getattr(m2, name)), name


def comparable(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in log]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run: its directory and log."""
    out = tmp_path_factory.mktemp("reference")
    log = tr.train(fresh_model(data), data, make_cfg(), l1_coeff=0.5, out_dir=out)
    return out, log


# -- the loop ---------------------------------------------------------------------------------------
def test_loss_decreases_and_artifacts_are_written(reference, data) -> None:
    out, log = reference
    assert [row["step"] for row in log] == list(range(5, STEPS + 1, 5))
    assert log[-1]["mse_a"] + log[-1]["mse_b"] < 0.5 * (log[0]["mse_a"] + log[0]["mse_b"])
    assert log[-1]["ev_a"] > log[0]["ev_a"] and log[-1]["ev_b"] > log[0]["ev_b"]
    assert log[-1]["tokens"] == STEPS * BATCH and log[-1]["l1_coeff"] == 0.5
    assert (out / crosscoder.WEIGHTS_FILE).exists() and (out / crosscoder.CONFIG_FILE).exists()
    assert not (out / tr.CHECKPOINT_DIR).exists()
    saved_log = io.read_json(out / tr.LOG_FILE)
    assert [row["step"] for row in saved_log] == [row["step"] for row in log]


def test_training_improves_held_out_reconstruction(data, tmp_path) -> None:
    model = fresh_model(data)
    x_a, x_b = data.get(data.eval_indices())
    before = model.loss(x_a, x_b, 0.0).total.item()
    tr.train(model, data, make_cfg(), l1_coeff=0.5, out_dir=tmp_path)
    after = model.loss(x_a, x_b, 0.0).total.item()
    assert after < 0.5 * before


# -- batches and schedules ---------------------------------------------------------------------------
def test_batch_indices_deterministic_and_one_pass_per_epoch() -> None:
    n_rows, bs = 50, 10
    epoch0 = np.concatenate([tr.batch_indices(s, bs, n_rows, seed=3) for s in range(5)])
    epoch1 = np.concatenate([tr.batch_indices(s, bs, n_rows, seed=3) for s in range(5, 10)])
    assert sorted(epoch0.tolist()) == list(range(n_rows)) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)
    again = np.concatenate([tr.batch_indices(s, bs, n_rows, seed=3) for s in range(5)])
    assert np.array_equal(epoch0, again)
    assert not np.array_equal(tr.batch_indices(0, bs, n_rows, seed=3), tr.batch_indices(0, bs, n_rows, seed=4))
    for step in range(10):
        b = tr.batch_indices(step, bs, n_rows, seed=3)
        assert len(b) == bs and np.all(np.diff(b) >= 0) and b.dtype == np.int64


def test_batch_indices_straddle_epochs_evenly() -> None:
    n_rows, bs = 23, 5  # 23 steps of 5 = exactly 5 epochs, batches cross epoch edges
    rows = np.concatenate([tr.batch_indices(s, bs, n_rows, seed=0) for s in range(23)])
    assert np.bincount(rows, minlength=n_rows).tolist() == [5] * n_rows
    assert tr.batch_indices(4, bs, n_rows, seed=0).tolist() == tr.batch_indices(4, bs, n_rows, seed=0).tolist()


def test_l1_schedule_warms_up_linearly() -> None:
    cfg, control = make_cfg(l1_warmup_frac=0.05), convergence.Control(l1=2.0)
    assert [convergence.l1_at(s, control, 100, cfg) for s in (0, 1, 2, 5, 50, 99)] == \
        pytest.approx([0.0, 0.4, 0.8, 2.0, 2.0, 2.0])
    assert convergence.l1_at(0, control, 100, make_cfg(l1_warmup_frac=0.0)) == 2.0


def test_lr_schedule_decays_to_zero_at_the_ceiling_when_unconverged() -> None:
    cfg, control = make_cfg(lr=1e-3, lr_decay_frac=0.2), convergence.Control(l1=1.0)
    lrs = []
    for s in range(100):
        lrs.append(convergence.lr_at(s, control, 100, cfg))
        convergence.after_step(control, s + 1, 100, cfg)
    assert lrs[:80] == [1e-3] * 80
    assert lrs[90] == pytest.approx(0.5e-3) and lrs[99] == pytest.approx(0.05e-3)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert control.converged is False and convergence.end_step(control, 100, cfg) == 100
    assert convergence.lr_at(99, convergence.Control(l1=1.0), 100, make_cfg(lr=1e-3, lr_decay_frac=0.0)) == 1e-3
    assert tr.n_steps(make_cfg(tokens=1000, batch_size=300)) == 3


# -- resume and failures -------------------------------------------------------------------------
class Interrupt(Exception):
    pass


def run_interrupted(data, out, die_at_step: int) -> None:
    def on_get(step, x_a, x_b):
        if step == die_at_step:
            raise Interrupt(f"killed at step {step}")
        return x_a, x_b

    with pytest.raises(Interrupt):
        tr.train(fresh_model(data), Faulty(data, on_get), make_cfg(), l1_coeff=0.5, out_dir=out)


def test_resume_is_bit_for_bit(reference, data, tmp_path, capsys) -> None:
    ref_dir, ref_log = reference
    run_interrupted(data, tmp_path, die_at_step=23)  # checkpoint at 20; steps 20-22 are lost
    state = io.read_json(tmp_path / tr.CHECKPOINT_DIR / tr.STATE_FILE)
    assert state["step"] == 20 and [row["step"] for row in state["log"]] == [5, 10, 15, 20]
    counted = Faulty(data, lambda step, x_a, x_b: (x_a, x_b))
    log = tr.train(fresh_model(data), counted, make_cfg(), l1_coeff=0.5, out_dir=tmp_path)
    assert counted.calls == STEPS - 20
    assert "resuming from step 20" in capsys.readouterr().out
    assert_same_weights(ref_dir, tmp_path)
    assert comparable(log) == comparable(ref_log)


def test_resume_is_bit_for_bit_on_the_sparse_step(data, tmp_path, capsys) -> None:
    """The sparse step (forced: sparse_below 1) reruns and resumes bit for bit too."""
    cfg = make_cfg(sparse_below=1.0)
    ref_log = tr.train(fresh_model(data), data, cfg, l1_coeff=0.5, out_dir=tmp_path / "ref")

    def die(step, x_a, x_b):
        if step == 23:
            raise Interrupt("killed")
        return x_a, x_b

    with pytest.raises(Interrupt):
        tr.train(fresh_model(data), Faulty(data, die), cfg, l1_coeff=0.5, out_dir=tmp_path / "resumed")
    log = tr.train(fresh_model(data), data, cfg, l1_coeff=0.5, out_dir=tmp_path / "resumed")
    assert "resuming from step 20" in capsys.readouterr().out
    assert_same_weights(tmp_path / "ref", tmp_path / "resumed")
    assert comparable(log) == comparable(ref_log)


def test_fused_and_autograd_steps_train_the_same_crosscoder(data, tmp_path) -> None:
    """The default fused step and autograd through Crosscoder.loss differ only by float rounding
    (which Adam may blow up to a full step on a few near-zero gradients, hence the norm test)."""
    logs = [tr.train(fresh_model(data), data, make_cfg(step=step, dtype="float32"), l1_coeff=0.5,
                     out_dir=tmp_path / step) for step in ("fused", "autograd")]
    fused, plain = crosscoder.load(tmp_path / "fused"), crosscoder.load(tmp_path / "autograd")
    assert (fused.W_enc_A != plain.W_enc_A).any()  # really two computations
    for name in crosscoder.PARAM_NAMES:
        a, b = getattr(fused, name), getattr(plain, name)
        assert (a - b).norm() <= 1e-3 * b.norm() + 1e-6, name
    for row, ref_row in zip(*logs):
        assert row["loss"] == pytest.approx(ref_row["loss"], rel=1e-4)


def test_nan_in_data_names_the_step_and_keeps_the_checkpoint(data, tmp_path) -> None:
    def on_get(step, x_a, x_b):
        if step == 13:
            x_b = x_b.clone()
            x_b[3, 5] = float("nan")
        return x_a, x_b

    with pytest.raises(tr.TrainingError, match=r"^step 13: loss is nan") as err:
        tr.train(fresh_model(data), Faulty(data, on_get), make_cfg(), l1_coeff=0.5, out_dir=tmp_path)
    checkpoint = tmp_path / tr.CHECKPOINT_DIR
    assert str(checkpoint) in str(err.value)
    assert io.read_json(checkpoint / tr.STATE_FILE)["step"] == 10
    weights = crosscoder.load(checkpoint)
    assert all(torch.isfinite(getattr(weights, n)).all() for n in crosscoder.PARAM_NAMES)


def _corrupt_weights(checkpoint) -> None:
    path = checkpoint / crosscoder.WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-8] + b"\x00" * 8)


def _bad_optimizer_groups(checkpoint) -> None:
    state = io.read_json(checkpoint / tr.STATE_FILE)
    state["optimizer"]["param_groups"] = []  # weights and hashes fine, optimizer state unusable
    io.write_json(checkpoint / tr.STATE_FILE, state)


def _optimizer_of_another_layout(checkpoint) -> None:
    """Adam's state of the encoders saved [A, H] (before they were stored latent by latent), hashes fine."""
    path = checkpoint / tr.OPTIMIZER_FILE
    tensors = io.load_tensors(path)
    enc = [name for name, _ in crosscoder.build(crosscoder.CrosscoderConfig(d_a=4, d_b=4, dict_size=8))
           .named_parameters()].index("W_enc_HA")  # its index in the optimizer's state
    io.save_tensors(path, {k: v.T.contiguous() if k.startswith(f"{enc}.") and v.dim() == 2 else v
                           for k, v in tensors.items()})
    state = io.read_json(checkpoint / tr.STATE_FILE)
    state["optimizer_sha256"] = io.file_sha256(path)
    io.write_json(checkpoint / tr.STATE_FILE, state)


def _no_step(checkpoint) -> None:
    state = io.read_json(checkpoint / tr.STATE_FILE)
    del state["step"]
    io.write_json(checkpoint / tr.STATE_FILE, state)


def _truncated_state(checkpoint) -> None:
    (checkpoint / tr.STATE_FILE).write_text(json.dumps({"step": 20})[:-3], encoding="utf-8")


@pytest.mark.parametrize("corrupt", [_corrupt_weights, _bad_optimizer_groups, _optimizer_of_another_layout,
                                     _no_step, _truncated_state])
def test_unusable_checkpoint_is_ignored_with_a_warning(corrupt, reference, data, tmp_path, capsys) -> None:
    ref_dir, _ = reference
    run_interrupted(data, tmp_path, die_at_step=23)
    corrupt(tmp_path / tr.CHECKPOINT_DIR)
    capsys.readouterr()
    counted = Faulty(data, lambda step, x_a, x_b: (x_a, x_b))
    tr.train(fresh_model(data), counted, make_cfg(), l1_coeff=0.5, out_dir=tmp_path)
    assert "warning: ignoring unusable checkpoint" in capsys.readouterr().out
    assert counted.calls == STEPS  # from the start
    assert_same_weights(ref_dir, tmp_path)  # and from the initial weights, not half-loaded ones


# -- evaluate ----------------------------------------------------------------------------------------
def test_evaluate_matches_a_direct_computation(reference, data) -> None:
    ref_dir, _ = reference
    model = crosscoder.load(ref_dir)
    result = tr.evaluate(model, data, max_tokens=20, batch_size=7)
    idx = data.eval_indices(20)
    x_a, x_b = data.get(idx)
    with torch.no_grad():
        f, xhat_a, xhat_b = model(x_a, x_b)
    assert result["eval_tokens"] == 20
    assert result["mean_act"].shape == (H,) and result["mean_act"].dtype == torch.float32
    torch.testing.assert_close(result["mean_act"], f.mean(0), rtol=1e-5, atol=1e-6)
    for side, x, xhat in (("A", x_a, xhat_a), ("B", x_b, xhat_b)):
        ev = result["explained_variance"][side]
        assert -math.inf < ev <= 1
        assert ev == pytest.approx(explained_variance(x.double(), xhat.double()).item(), rel=1e-5, abs=1e-6)
    assert result["l0"] == pytest.approx((f > 0).float().sum(1).mean().item())
    assert result["dead_fraction"] == pytest.approx((f.sum(0) == 0).float().mean().item())


@pytest.mark.parametrize("architecture, sparse", [("relu_l1", True), ("batchtopk", True), ("dfc", False)])
def test_sparse_decode_equals_the_dense_one(architecture, sparse, monkeypatch) -> None:
    """Few latents fired: the plain linear decoders sum over them only (the dedicated-feature one keeps
    its own decode), with the dense decode's result up to float rounding."""
    model = crosscoder.build(CrosscoderConfig(d_a=12, d_b=16, dict_size=96, architecture=architecture, k=4), seed=0)
    gen = torch.Generator().manual_seed(1)
    f = torch.relu(torch.randn(40, 96, generator=gen)) * (torch.rand(40, 96, generator=gen) < 0.05)
    built = []
    real = evaluate_mod.FiredPairs
    monkeypatch.setattr(evaluate_mod, "FiredPairs", lambda f_NH: built.append(1) or real(f_NH))
    with torch.no_grad():
        got, want = evaluate_mod.decode(model, f), model.decode(f)
    assert len(built) == (1 if sparse else 0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_evaluate_sparse_or_dense_decode_gives_the_same_numbers(reference, data, monkeypatch) -> None:
    """Fire rates, L0 and dead share exactly, explained variance to float rounding; the eval rows'
    total variance is read once per size."""
    model = crosscoder.load(reference[0])
    runs = []
    for below in (0.0, 1.0):  # never sparse, sparse whenever a latent is silent anywhere
        monkeypatch.setattr(evaluate_mod, "SPARSE_DECODE_BELOW", below)
        runs.append(tr.evaluate(model, data, max_tokens=30, batch_size=8))
    dense, sparse = runs
    assert dense["l0"] < model.cfg.dict_size  # some latents silent: below 1.0 took the sparse path
    assert torch.equal(dense["fire_rate"], sparse["fire_rate"]) and torch.equal(dense["mean_act"], sparse["mean_act"])
    assert dense["l0"] == sparse["l0"] and dense["dead_fraction"] == sparse["dead_fraction"]
    for side in "AB":
        assert sparse["explained_variance"][side] == pytest.approx(dense["explained_variance"][side], abs=1e-6)
    monkeypatch.setattr(data, "get", lambda idx: pytest.fail("the total variance was read again"))
    assert data.eval_total_variance(30, 8) == data.eval_total_variance(30, 8)


def test_evaluate_untrained_model_can_have_negative_explained_variance(data) -> None:
    model = fresh_model(data)
    with torch.no_grad():
        model.b_dec_A.fill_(10.0)  # a constant offset ruins the reconstruction of A
    result = tr.evaluate(model, data, max_tokens=50)
    assert result["explained_variance"]["A"] < 0 <= result["l0"]


def test_explained_variance_of_perfect_and_mean_reconstructions() -> None:
    x = torch.randn(30, 5, dtype=torch.float64)
    assert explained_variance(x, x).item() == 1.0
    assert explained_variance(x, x.mean(0).expand_as(x)).item() == pytest.approx(0.0, abs=1e-12)


# -- precision: auto trains exactly as the explicit dtype it resolves to -----------------------------
@pytest.mark.parametrize("native, dtype", [(False, "float32"), (True, "bfloat16")])
def test_auto_precision_trains_as_the_dtype_it_resolves_to(data, tmp_path, monkeypatch, native, dtype) -> None:
    from hidden_signatures import precision

    choice = precision.Choice("cpu", "forced by the test", native, dtype, "test")
    monkeypatch.setattr(precision, "detect", lambda device="cpu": choice)
    cfg = make_cfg(tokens=BATCH * 10, checkpoint_every=100)
    tr.train(fresh_model(data), data, dataclasses.replace(cfg, dtype="auto"), 0.5, tmp_path / "auto")
    tr.train(fresh_model(data), data, dataclasses.replace(cfg, dtype=dtype), 0.5, tmp_path / "explicit")
    other = "bfloat16" if dtype == "float32" else "float32"
    tr.train(fresh_model(data), data, dataclasses.replace(cfg, dtype=other), 0.5, tmp_path / "other")
    assert_same_weights(tmp_path / "auto", tmp_path / "explicit")
    w = crosscoder.WEIGHTS_FILE
    assert (tmp_path / "auto" / w).read_bytes() != (tmp_path / "other" / w).read_bytes()


# -- centred start: no latent silent from the first step on an uncentred stream --------------------
def _dead_share(model: crosscoder.Crosscoder, x_a: torch.Tensor, x_b: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.encode(x_a, x_b) > 0).any(0).logical_not().float().mean().item()


def test_centred_start_wakes_the_latents_a_zero_bias_start_leaves_silent() -> None:
    gen = torch.Generator().manual_seed(3)
    offset_a, offset_b = torch.randn(32, generator=gen), torch.randn(24, generator=gen)
    x_a = torch.randn(2000, 32, generator=gen) + 8 * offset_a  # a mean far larger than the spread
    x_b = torch.randn(2000, 24, generator=gen) + 8 * offset_b
    model = crosscoder.build(CrosscoderConfig(d_a=32, d_b=24, dict_size=256), seed=0)
    assert _dead_share(model, x_a, x_b) > 0.3  # zero biases: the latents pointing away from the mean
    model.centre(x_a.mean(0), x_b.mean(0))
    assert _dead_share(model, x_a, x_b) == 0.0
    pre = model.pre_acts(x_a.mean(0, keepdim=True), x_b.mean(0, keepdim=True))
    assert pre.abs().max().item() < 1e-4
    assert torch.equal(model.b_dec_A, x_a.mean(0)) and torch.equal(model.b_dec_B, x_b.mean(0))


def test_training_starts_centred_on_the_first_rows_only_when_asked(data, tmp_path) -> None:
    model = fresh_model(data)
    tr.centre_start(model, data, make_cfg(), torch.device("cpu"))
    idx = tr.batch_indices(0, min(tr.CENTRE_ROWS, data.n_train), data.n_train, make_cfg().seed)
    x_a, _ = data.train_batch(idx)
    assert torch.allclose(model.b_dec_A, x_a.double().mean(0).float())
    cfg = make_cfg(tokens=BATCH, checkpoint_every=100, lr=1e-12)  # one step that barely moves anything
    kept, centred = fresh_model(data), fresh_model(data)
    tr.train(kept, data, dataclasses.replace(cfg, centre_init=False), 0.5, tmp_path / "off")
    tr.train(centred, data, cfg, 0.5, tmp_path / "on")
    assert kept.b_dec_A.abs().max().item() < 1e-6 < centred.b_dec_A.abs().max().item()
