"""train.sparse_below: auto — the per-machine sparse-vs-dense probe, its threshold rule, its cache and its pins."""

from __future__ import annotations

import pytest
import torch

from hidden_signatures import io
from hidden_signatures.checks import ParamsError
from hidden_signatures.crosscoders import crosscoder as cc_mod
from hidden_signatures.crosscoders import sparse_probe, train
from hidden_signatures.crosscoders.train_config import TrainConfig

SHAPE = dict(d_a=16, d_b=24, dict_size=512, batch=64)


@pytest.fixture
def unpinned(monkeypatch, tmp_path):
    """The probe as a user's run sees it: no pin, and a cache of its own."""
    monkeypatch.delenv(sparse_probe.FORCE_ENV, raising=False)
    monkeypatch.setenv("HIDDEN_SIGNATURES_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_threshold_is_the_densest_rung_that_pays_with_every_sparser_one() -> None:
    assert sparse_probe.threshold({0.002: 2.0, 0.004: 1.5, 0.008: 1.05, 0.016: 1.3}) == 0.004
    assert sparse_probe.threshold({0.002: 1.09, 0.004: 3.0}) == 0.0  # never sparse: the sparsest rung loses
    assert sparse_probe.threshold({d: 2.0 for d in sparse_probe.DENSITIES}) == sparse_probe.DENSITIES[-1]
    assert sparse_probe.threshold({}) == 0.0


def test_numbers_pass_through_and_bad_settings_name_the_field(monkeypatch) -> None:
    assert sparse_probe.resolve(0.2, **SHAPE, dtype=torch.float32) == 0.2
    assert sparse_probe.resolve(0, **SHAPE, dtype=torch.float32) == 0.0
    for bad in ("fast", 1.5, -0.1, True, None):
        with pytest.raises(sparse_probe.SparseBelowError, match="train.sparse_below: .* accepted: auto or a number"):
            sparse_probe.resolve(bad, **SHAPE, dtype=torch.float32)
        with pytest.raises(ParamsError, match="train.sparse_below"):
            TrainConfig(sparse_below=bad)
    assert TrainConfig().sparse_below == sparse_probe.AUTO
    monkeypatch.setenv(sparse_probe.FORCE_ENV, "0.125")
    assert sparse_probe.resolve("auto", **SHAPE, dtype=torch.float32) == 0.125
    monkeypatch.setenv(sparse_probe.FORCE_ENV, "often")
    with pytest.raises(sparse_probe.SparseBelowError, match="HIDDEN_SIGNATURES_SPARSE_BELOW: 'often'"):
        sparse_probe.resolve("auto", **SHAPE, dtype=torch.float32)


def test_set_density_fires_about_the_share_asked_for() -> None:
    gen = torch.Generator().manual_seed(0)
    x_NA, x_NB = torch.randn(256, 16, generator=gen), torch.randn(256, 24, generator=gen)
    model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=16, d_b=24, dict_size=512), seed=0)
    for density in (0.004, 0.031):
        got = sparse_probe.set_density(model, x_NA, x_NB, density)
        assert got == pytest.approx(density, rel=0.05)
        f = model.encode(x_NA, x_NB)
        assert float((f > 0).float().mean()) == pytest.approx(got, rel=1e-3)


def test_probe_stops_at_the_first_rung_where_sparse_stops_paying(monkeypatch) -> None:
    """Fake clocks: the sparse step costs density * 40 s, the dense one 0.4 s -> gain 1 / (100 density)."""
    probed: list[float] = []
    state = {}

    def fake_set_density(model, x_NA, x_NB, density):
        probed.append(density)
        state["density"] = density
        return density

    def fake_step(model, x_NA, x_NB, dtype, below):
        return lambda: state.__setitem__("below", below)

    def fake_timed(fn, device):
        fn()
        return state["density"] * 40 if state["below"] == 1.0 else 0.4

    monkeypatch.setattr(sparse_probe, "set_density", fake_set_density)
    monkeypatch.setattr(sparse_probe, "_step", fake_step)
    monkeypatch.setattr(sparse_probe, "_timed", fake_timed)
    gains = sparse_probe.probe(8, 8, 4096, 16, torch.float32, torch.device("cpu"))
    assert probed == [0.002, 0.004, 0.008, 0.016]  # 0.016: gain 0.62 < MIN_GAIN, denser rungs are not timed
    assert gains[0.008] == pytest.approx(1.25) and sparse_probe.threshold(gains) == 0.008
    probed.clear()
    sparse_probe.probe(8, 8, 256, 16, torch.float32, torch.device("cpu"))
    assert probed[0] == 0.004  # 0.002 of 256 latents is under one latent per token: skipped


def test_auto_measures_once_then_reads_the_cache(unpinned, monkeypatch) -> None:
    below = sparse_probe.resolve("auto", **SHAPE, dtype=torch.float32)
    assert below == 0.0 or below in sparse_probe.DENSITIES
    (path,) = (unpinned / "precision").glob("sparse-*.json")
    record = io.read_json(path)
    assert record["sparse_below"] == below and record["dtype"] == "float32" and record["dict_size"] == 512
    assert record["gain_by_density"] and all(g > 0 for g in record["gain_by_density"].values())
    assert sparse_probe.threshold({float(d): g for d, g in record["gain_by_density"].items()}) == below

    def probed_again(*args):
        raise RuntimeError("probed")

    monkeypatch.setattr(sparse_probe, "probe", probed_again)
    assert sparse_probe.resolve("auto", **SHAPE, dtype=torch.float32) == below
    with pytest.raises(RuntimeError, match="probed"):  # another shape is another measurement
        sparse_probe.resolve("auto", **{**SHAPE, "dict_size": 256}, dtype=torch.float32)
    monkeypatch.setattr(sparse_probe.fused_loss, "STEP_VERSION", sparse_probe.fused_loss.STEP_VERSION + 1)
    with pytest.raises(RuntimeError, match="probed"):  # so is a step whose speed has changed
        sparse_probe.resolve("auto", **SHAPE, dtype=torch.float32)


def test_a_corrupt_cache_is_measured_again(unpinned, monkeypatch) -> None:
    monkeypatch.setattr(sparse_probe, "probe", lambda *a: {0.002: 2.0, 0.004: 1.0})
    sparse_probe.resolve("auto", **SHAPE, dtype=torch.float32)
    (path,) = (unpinned / "precision").glob("sparse-*.json")
    path.write_text("{ truncated")
    assert sparse_probe.resolve("auto", **SHAPE, dtype=torch.float32) == 0.002
    assert io.read_json(path)["sparse_below"] == 0.002


def test_the_trainer_resolves_auto_at_one_process_share_of_the_batch(unpinned, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(sparse_probe, "probe", lambda d_a, d_b, H, batch, dtype, device:
                        seen.append((d_a, d_b, H, batch, dtype)) or {0.002: 2.0, 0.004: 2.0, 0.008: 0.5})
    model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=16, d_b=24, dict_size=512), seed=0)
    cfg = TrainConfig(tokens=1024, batch_size=128, dtype="float32")
    assert train.LossModule(model, cfg, torch.device("cpu"), world=2).sparse_below == 0.004
    assert seen == [(16, 24, 512, 64, torch.float32)]
    variant = cc_mod.build(cc_mod.CrosscoderConfig(d_a=16, d_b=24, dict_size=512, architecture="batchtopk"), seed=0)
    assert train.LossModule(variant, cfg, torch.device("cpu")).sparse_below == 0.0  # autograd step: not probed
    assert len(seen) == 1
