"""The stopping rule, the L1 controller and dead-latent resampling, on planted synthetic data."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hidden_signatures import io
from hidden_signatures.harvest.store import PairedActivations
from hidden_signatures.crosscoders import convergence, crosscoder, resample
from hidden_signatures.validation import recovery
from hidden_signatures.validation import synthetic
from hidden_signatures.crosscoders import train as tr
from hidden_signatures.run.params import ParamsError, TrainConfig

H, BATCH = 128, 128


class MemoryPair:
    """Paired rows held in memory with the slice of PairedActivations that train() reads."""

    def __init__(self, x_a: torch.Tensor, x_b: torch.Tensor, eval_share: float = 0.2):
        s_a, s_b = recovery.norm_factors(x_a, x_b)
        self.x_a, self.x_b = x_a * s_a, x_b * s_b
        n_eval = int(len(x_a) * eval_share)
        self.eval_rows = np.arange(len(x_a) - n_eval, len(x_a))
        self.train_rows = np.arange(len(x_a) - n_eval)
        self.d_a, self.d_b = x_a.shape[1], x_b.shape[1]
        self._eval_variance = {}

    @property
    def n_train(self) -> int:
        return len(self.train_rows)

    def get(self, idx):
        return self.x_a[idx], self.x_b[idx]

    def train_batch(self, positions):
        return self.get(np.sort(self.train_rows[positions]))

    def eval_indices(self, max_tokens=None):
        return self.eval_rows if max_tokens is None else self.eval_rows[:max_tokens]

    eval_total_variance = PairedActivations.eval_total_variance


@pytest.fixture(scope="module")
def pair() -> MemoryPair:
    cfg = synthetic.SyntheticConfig(d_a=24, d_b=32, n_features=96, mean_active=6.0, seed=3)
    data = synthetic.make_pair(cfg, 12_000, keep_acts=False)
    return MemoryPair(data.x_a, data.x_b)


def cfg_of(**overrides) -> TrainConfig:
    base = dict(tokens=BATCH * 300, batch_size=BATCH, lr=3e-3, l1_warmup_frac=0.05, lr_decay_frac=0.2,
                checkpoint_every=40, log_every=20, eval_every=20, eval_tokens=2000, l1_rate=0.05, seed=1)
    return TrainConfig(**dict(base, **overrides))


def fresh(pair: MemoryPair, seed: int = 0) -> crosscoder.Crosscoder:
    return crosscoder.build(crosscoder.CrosscoderConfig(d_a=pair.d_a, d_b=pair.d_b, dict_size=H), seed)


def record(out) -> dict:
    return io.read_json(out / tr.CURVE_FILE)


# -- the rule on hand-made curves ---------------------------------------------------------------
def curve_of(evs, l0=50.0, step_tokens=1000):
    return [{"tokens": (i + 1) * step_tokens, "ev_a": ev, "ev_b": ev, "l0": l0, "dead_fraction": 0.0}
            for i, ev in enumerate(evs)]


def test_rule_fires_on_a_flat_curve_and_not_on_a_rising_one() -> None:
    cfg = cfg_of(converge_gain=0.005, converge_window=0.2, min_frac=0.25)
    flat = curve_of([0.5, 0.7, 0.8, 0.81, 0.812, 0.813, 0.814, 0.815, 0.816, 0.817])
    fired = convergence.rule_met(flat, 20_000, cfg)
    assert fired is not None and fired["ev_gain"] < 0.005 and fired["since_tokens"] == 8000
    rising = curve_of([0.5, 0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78, 0.80, 0.82])
    assert convergence.rule_met(rising, 20_000, cfg) is None


def test_rule_does_not_call_a_falling_curve_converged() -> None:
    falling = curve_of([0.5, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.5, 0.2])
    assert convergence.rule_met(falling, 20_000, cfg_of()) is None


def test_rule_waits_for_min_frac_and_for_the_target_l0() -> None:
    flat = curve_of([0.8] * 10)
    assert convergence.rule_met(flat, 20_000, cfg_of(min_frac=0.25)) is not None
    assert convergence.rule_met(flat, 100_000, cfg_of(min_frac=0.25)) is None  # 10k of 100k seen
    assert convergence.rule_met(flat, 20_000, cfg_of(target_l0=45)) is not None  # 50 is within 1.25x
    assert convergence.rule_met(flat, 20_000, cfg_of(target_l0=20)) is None
    assert convergence.rule_met(curve_of([0.8]), 1000, cfg_of(min_frac=0.0)) is None  # no earlier point


def _record(evs, converged=False, decay_start=None, rule=None):
    return {"converged": converged, "tokens": 1000 * len(evs), "token_ceiling": 1000 * len(evs),
            "decay_start_tokens": decay_start, "rule": rule, "curve": curve_of(evs),
            "stopping_rule": {"converge_gain": 0.005, "converge_window": 0.2, "min_frac": 0.25, "target_l0": 64}}


def test_gain_at_stop_reads_the_window_before_the_ceilings_decay() -> None:
    """Unconverged: EV's change over the last 20% up to where the decay began (8000 vs 6000 tokens
    here), not the decay's own rise after it; converged: the rule's own number; too short: None."""
    rising = [0.5, 0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78, 0.85, 0.9]
    assert convergence.window_gain(curve_of(rising), 8000, 0.2) == {"ev_gain": 0.78 - 0.74, "since_tokens": 6000,
                                                                   "tokens": 8000}
    assert convergence.gain_at_stop(_record(rising, decay_start=8000)) == 0.78 - 0.74
    assert convergence.gain_at_stop(_record(rising)) == 0.9 - 0.78  # no decay recorded: up to the end
    assert convergence.gain_at_stop(_record([0.5])) is None  # no row as early as the window's start
    done = _record([0.8] * 10, converged=True, decay_start=8000, rule={"ev_gain": 0.001, "since_tokens": 6000})
    assert convergence.gain_at_stop(done) == 0.001


def test_the_verdict_line_says_how_far_an_unconverged_run_was_from_the_rule() -> None:
    from hidden_signatures.run import point_analysis

    line = point_analysis.convergence_line(_record([0.5, 0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78, 0.85, 0.9],
                                                   decay_start=8000))
    assert line == ("not converged at 0.01M of 0.01M tokens (stopped by the token ceiling; EV changed by +0.0400 "
                    "over the last 20% before its decay, where the rule asks for under 0.005)")
    done = _record([0.8] * 10, converged=True, decay_start=8000, rule={"ev_gain": 0.001})
    assert point_analysis.convergence_line(done).endswith("(EV changed by +0.0010 over the last 20%)")
    title = point_analysis.convergence_figure(SimpleNamespace(name="p"), "last", done).layout.title.text
    assert title.startswith("p · last: converged at 0.01M of 0.01M tokens<br>") and "+0.0010" in title  # 2 lines


def test_controller_raises_l1_above_target_and_lowers_it_below() -> None:
    assert convergence.next_l1(1.0, 200.0, 50.0, 0.01) > 1.0
    assert convergence.next_l1(1.0, 10.0, 50.0, 0.01) < 1.0
    assert convergence.next_l1(1.0, 50.0, 50.0, 0.01) == 1.0
    assert convergence.next_l1(1.0, 1e6, 50.0, 0.01) == pytest.approx(np.exp(0.01))  # clipped
    assert convergence.next_l1(1.0, 0.0, 50.0, 0.01) == pytest.approx(np.exp(-0.01))


def test_bad_settings_name_the_field() -> None:
    for field, value in (("target_l0", 0), ("converge_window", 0.0), ("eval_every", -1), ("resample", "yes"),
                         ("centre_init", 1), ("lr_warmup_frac", 1.5)):
        with pytest.raises(ParamsError, match=f"train.{field}"):
            cfg_of(**{field: value})


def test_lr_warms_up_linearly_then_holds() -> None:
    cfg, control = cfg_of(lr=1e-3, lr_warmup_frac=0.1), convergence.Control(l1=1.0)
    assert [convergence.lr_at(s, control, 100, cfg) for s in (0, 4, 9, 10, 50)] == \
        pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    assert convergence.lr_at(0, control, 100, cfg_of(lr=1e-3)) == 1e-3  # no warm-up by default


def test_resampling_stays_open_through_three_quarters_of_the_decay() -> None:
    cfg, control = cfg_of(lr_decay_frac=0.2), convergence.Control(l1=1.0)
    assert convergence.resamples_at(70, control, 100, cfg)  # no decay yet
    control.decay_start = 80  # the forced decay: ends at the ceiling, 100
    assert [convergence.resamples_at(s, control, 100, cfg) for s in (80, 89, 94, 95, 99)] == [True, True, True, False, False]
    control.decay_start = 40  # the rule fired: the decay runs 10 more steps
    assert [convergence.resamples_at(s, control, 100, cfg) for s in (45, 46, 47, 50)] == [True, True, False, False]


# -- training ------------------------------------------------------------------------------------
def test_batchtopk_is_not_steered_by_the_l1_weight(pair, tmp_path) -> None:
    """k sets BatchTopK's L0, so the controller leaves the (ignored) L1 weight alone."""
    model = crosscoder.build(crosscoder.CrosscoderConfig(d_a=pair.d_a, d_b=pair.d_b, dict_size=H,
                                                         architecture="batchtopk", k=8), seed=0)
    tr.train(model, pair, cfg_of(tokens=BATCH * 60, target_l0=2, converge_gain=0.0), l1_coeff=0.3, out_dir=tmp_path)
    assert record(tmp_path)["final_l1_coeff"] == 0.3


@pytest.mark.parametrize("target", [4, 16])
def test_l1_controller_brings_held_out_l0_to_the_target(pair, tmp_path, target) -> None:
    tr.train(fresh(pair), pair, cfg_of(target_l0=target, converge_gain=0.0), l1_coeff=0.3, out_dir=tmp_path)
    rec = record(tmp_path)
    assert abs(np.log(rec["curve"][-1]["l0"] / target)) < np.log(1.3), rec["curve"][-1]


def test_without_a_target_l0_stays_where_the_fixed_l1_puts_it(pair, tmp_path) -> None:
    """The controller is what moves L0: the same run with a fixed weight ends far from target 4."""
    tr.train(fresh(pair), pair, cfg_of(converge_gain=0.0), l1_coeff=0.3, out_dir=tmp_path)
    rec = record(tmp_path)
    assert rec["final_l1_coeff"] == 0.3 and rec["curve"][-1]["l0"] > 4 * 1.3


def test_stopping_rule_ends_an_easy_run_early_and_a_capped_one_unconverged(pair, tmp_path) -> None:
    tr.train(fresh(pair), pair, cfg_of(tokens=BATCH * 2000, target_l0=8, converge_gain=0.03), l1_coeff=0.3, out_dir=tmp_path / "easy")
    easy = record(tmp_path / "easy")
    assert easy["converged"] is True and easy["tokens"] < easy["token_ceiling"]
    assert easy["rule"]["ev_gain"] < 0.03 and easy["decay_start_tokens"] == easy["rule"]["tokens"]
    tr.train(fresh(pair), pair, cfg_of(tokens=BATCH * 60, target_l0=8), l1_coeff=0.3, out_dir=tmp_path / "cap")
    capped = record(tmp_path / "cap")
    assert capped["converged"] is False and capped["tokens"] == capped["token_ceiling"] == BATCH * 60
    assert capped["rule"]["reason"] == "token ceiling"


def test_resampling_revives_dead_latents(pair, tmp_path) -> None:
    def half_dead():
        model = fresh(pair)
        with torch.no_grad():
            model.b_enc[: H // 2] = -100.0  # never fire: zero gradient, dead for good without resampling
        return model

    base = dict(tokens=BATCH * 200, converge_gain=0.0, centre_init=False)  # centring would reset b_enc
    tr.train(half_dead(), pair, cfg_of(**base, resample_max=1.0), l1_coeff=0.3, out_dir=tmp_path / "kept")
    tr.train(half_dead(), pair, cfg_of(**base, resample_max=0.05), l1_coeff=0.3, out_dir=tmp_path / "capped")
    assert record(tmp_path / "capped")["curve"][0]["resampled"] == int(0.05 * H)
    tr.train(half_dead(), pair, cfg_of(**base, resample=False), l1_coeff=0.3, out_dir=tmp_path / "off")
    kept, off = record(tmp_path / "kept"), record(tmp_path / "off")
    assert off["curve"][-1]["dead_fraction"] >= 0.5
    assert kept["curve"][-1]["dead_fraction"] <= 0.1 and kept["curve"][0]["resampled"] >= H // 2


def test_dead_latents_are_re_aimed_until_three_quarters_through_the_final_decay(pair, tmp_path) -> None:
    model = fresh(pair)
    with torch.no_grad():
        model.b_enc[: H // 2] = -100.0  # dead for good unless re-aimed
    cfg = cfg_of(tokens=BATCH * 200, lr_decay_frac=0.75, converge_gain=0.0, centre_init=False, resample_max=0.02)
    tr.train(model, pair, cfg, l1_coeff=0.3, out_dir=tmp_path / "run")  # 2 re-aimed per evaluation
    rec = record(tmp_path / "run")
    start, end = rec["decay_start_tokens"], rec["tokens"]
    assert start == BATCH * 50 and end == BATCH * 200
    aimed = [row["tokens"] for row in rec["curve"] if row.get("resampled")]
    assert any((start + end) / 2 < t < start + 3 * (end - start) / 4 for t in aimed)  # trainer 5 stopped halfway
    assert max(aimed) < start + 3 * (end - start) / 4


def _trained_a_while(pair, steps: int = 20):
    """A fresh crosscoder and its Adam after a few steps, so that every moment is non-zero."""
    model = fresh(pair)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_a, x_b = pair.get(np.arange(256))
    for _ in range(steps):
        opt.zero_grad()
        model.loss(x_a, x_b, 0.1).total.backward()
        opt.step()
    return model, opt, x_a, x_b


def _moment(model, opt, name: str, key: str) -> torch.Tensor:
    """Adam's `key` state of the public tensor `name`, in that tensor's layout."""
    return model.as_named(name, opt.state[model.stored(name)][key])


def test_resample_restarts_the_moments_of_resampled_latents(pair) -> None:
    """First moment 0; second moment the live latents' mean, so the re-aimed latent steps like a live one."""
    model, opt, x_a, x_b = _trained_a_while(pair)
    dead = torch.zeros(H, dtype=torch.bool)
    dead[:3] = True
    before = model.W_dec_A[5].clone()
    live_v = {name: _moment(model, opt, name, "exp_avg_sq").clone() for name in ("W_dec_B", "W_enc_A", "b_enc")}
    assert resample.resample(model, opt, dead, x_a, x_b, seed=0) == 3
    assert torch.equal(model.W_dec_A[5], before)
    assert torch.all(_moment(model, opt, "W_enc_A", "exp_avg")[:, :3] == 0)
    v = {name: _moment(model, opt, name, "exp_avg_sq") for name in live_v}
    torch.testing.assert_close(v["W_dec_B"][:3], live_v["W_dec_B"][3:].mean(0).expand(3, -1))
    torch.testing.assert_close(v["W_enc_A"][:, :3], live_v["W_enc_A"][:, 3:].mean(1, keepdim=True).expand(-1, 3))
    torch.testing.assert_close(v["b_enc"][:3], live_v["b_enc"][3:].mean().expand(3))
    assert torch.equal(v["b_enc"][3:], live_v["b_enc"][3:]) and bool((v["b_enc"][:3] > 0).all())


def test_a_resampled_latent_late_in_a_run_takes_an_ordinary_step(pair) -> None:
    """Late in a run Adam's bias correction is ~1: with a zeroed second moment the re-aimed latent's
    first step would be (1 - beta1) / sqrt(1 - beta2) = 3.2 learning rates, element by element."""
    model, opt, x_a, x_b = _trained_a_while(pair)
    for state in opt.state.values():
        state["step"].fill_(10_000)
    dead = torch.zeros(H, dtype=torch.bool)
    dead[:8] = True
    resample.resample(model, opt, dead, x_a, x_b, seed=0)
    before = model.b_enc.detach().clone()
    opt.zero_grad()
    model.loss(x_a, x_b, 0.1).total.backward()
    assert bool((model.b_enc.grad[:8] != 0).all())  # the re-aimed latents fire, so they are stepped
    opt.step()
    step_H = (model.b_enc.detach() - before).abs() / 1e-3
    assert float(step_H[:8].max()) < 1.0, step_H[:8]



def test_resampled_latents_fire_as_rarely_as_live_ones_on_uncentred_inputs(pair) -> None:
    """Residual streams are far from centred: with a zero bias a resampled latent would fire on most rows."""
    model = fresh(pair)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_a, x_b = pair.get(np.arange(1024))
    x_a, x_b = x_a + 3 * x_a.std(), x_b + 3 * x_b.std()  # a large shared mean, as in a real residual stream
    with torch.no_grad():  # live latents fire on about 5% of rows
        model.b_enc.copy_(-torch.quantile(model.pre_acts(x_a, x_b) - model.b_enc, 0.95, dim=0))
    dead = torch.zeros(H, dtype=torch.bool)
    dead[:8] = True
    resample.resample(model, opt, dead, x_a, x_b, seed=0)
    fired = (model.encode(x_a, x_b) > 0).float().mean(0)
    assert 0 < fired[:8].mean() < 0.1 and fired[8:].mean() < 0.1


def test_resampling_a_dedicated_feature_crosscoder_keeps_its_partition(pair) -> None:
    cfg = crosscoder.CrosscoderConfig(d_a=pair.d_a, d_b=pair.d_b, dict_size=H, architecture="dfc",
                                      dfc_sizes={"a_only": 16, "b_only": 16})
    model = crosscoder.build(cfg, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_a, x_b = pair.get(np.arange(256))
    dead = torch.zeros(H, dtype=torch.bool)
    dead[[0, 20, 40]] = True  # an A-only, a B-only and a shared slot
    before = model.W_dec_A[40].clone()
    assert resample.supports(model) and resample.resample(model, opt, dead, x_a, x_b, seed=0) == 3
    assert torch.all(model.W_dec_B[0] == 0) and torch.all(model.W_enc_B[:, 0] == 0)  # A-only stays A-only
    assert torch.all(model.W_dec_A[20] == 0) and torch.all(model.W_dec_B[20] != 0)
    assert not torch.equal(model.W_dec_A[40], before)


def test_resampled_batchtopk_latents_rank_with_the_live_ones_and_restart_their_counters(pair) -> None:
    """BatchTopK ranks by f * decoder norm: a resampled latent gets the mean live norm (an L1 one a fifth
    of it) and its silence counter restarts, so AuxK does not count it dead at once."""
    cfg = crosscoder.CrosscoderConfig(d_a=pair.d_a, d_b=pair.d_b, dict_size=H, architecture="batchtopk", k=4)
    model = crosscoder.build(cfg, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_a, x_b = pair.get(np.arange(256))
    with torch.no_grad():
        model.W_dec_A[3:].mul_(10)
        model.W_dec_B[3:].mul_(10)
    model.num_tokens_since_fired.fill_(10**9)
    dead = torch.zeros(H, dtype=torch.bool)
    dead[:3] = True
    assert resample.supports(model) and resample.resample(model, opt, dead, x_a, x_b, seed=0) == 3
    norms = torch.cat([model.W_dec_A, model.W_dec_B], 1).norm(dim=1)
    assert torch.allclose(norms[:3], norms[3:].mean().expand(3), rtol=1e-4)
    assert model.num_tokens_since_fired[:3].eq(0).all() and model.num_tokens_since_fired[3:].eq(10**9).all()
    relu = fresh(pair)
    relu.W_dec_A.data.mul_(10)
    relu.W_dec_B.data.mul_(10)
    resample.resample(relu, torch.optim.Adam(relu.parameters()), dead, x_a, x_b, seed=0)
    relu_norms = torch.cat([relu.W_dec_A, relu.W_dec_B], 1).norm(dim=1)
    assert relu_norms[:3].max() < 0.25 * relu_norms[3:].mean()


class Interrupt(Exception):
    pass


def test_a_controlled_early_stopped_run_resumes_bit_for_bit(pair, tmp_path, capsys) -> None:
    """Control state, curve and resampling survive a kill: the resumed run ends where the whole one does."""
    # an uncentred start, so that some latents die and resampling has work to survive a kill
    cfg = cfg_of(tokens=BATCH * 800, target_l0=8, converge_gain=0.05, centre_init=False)
    tr.train(fresh(pair), pair, cfg, l1_coeff=0.3, out_dir=tmp_path / "ref")
    ref = record(tmp_path / "ref")
    assert ref["converged"] and any(row.get("resampled") for row in ref["curve"])

    calls = {"n": 0}
    real = pair.train_batch

    def dying(positions):
        calls["n"] += 1
        if calls["n"] == 130:
            raise Interrupt("killed")
        return real(positions)

    pair.train_batch = dying
    try:
        with pytest.raises(Interrupt):
            tr.train(fresh(pair), pair, cfg, l1_coeff=0.3, out_dir=tmp_path / "resumed")
    finally:
        del pair.train_batch
    tr.train(fresh(pair), pair, cfg, l1_coeff=0.3, out_dir=tmp_path / "resumed")
    assert "resuming from step" in capsys.readouterr().out
    for name in (crosscoder.WEIGHTS_FILE, tr.CURVE_FILE):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
