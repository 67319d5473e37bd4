"""Tests for crosscoder.py: shapes, initialisation, the loss by hand, gradients, safe save/load."""

from __future__ import annotations

import pickle
from dataclasses import asdict

import pytest
import torch

from hidden_signatures import io
from hidden_signatures.crosscoders import crosscoder
from hidden_signatures.crosscoders.crosscoder import CrosscoderConfig

D_A, D_B, H = 12, 20, 40


def make(seed: int = 0, **overrides) -> crosscoder.Crosscoder:
    """A tiny ReLU+L1 crosscoder with different widths for A and B."""
    return crosscoder.build(CrosscoderConfig(**dict(dict(d_a=D_A, d_b=D_B, dict_size=H), **overrides)), seed)


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_A, generator=gen), torch.randn(n, D_B, generator=gen)


def test_shapes_with_different_widths() -> None:
    model = make()
    shapes = {name: tuple(getattr(model, name).shape) for name in crosscoder.PARAM_NAMES}
    assert shapes == {"W_enc_A": (D_A, H), "W_enc_B": (D_B, H), "b_enc": (H,), "W_dec_A": (H, D_A),
                      "W_dec_B": (H, D_B), "b_dec_A": (D_A,), "b_dec_B": (D_B,)}
    x_a, x_b = batch(7)
    f, xhat_a, xhat_b = model(x_a, x_b)
    assert f.shape == (7, H) and xhat_a.shape == (7, D_A) and xhat_b.shape == (7, D_B)
    assert torch.all(f >= 0)


def test_init_decoder_norms_encoder_transpose_zero_biases() -> None:
    model = make(dec_init_norm=0.08)
    norm_a, norm_b = model.decoder_norms()
    torch.testing.assert_close(norm_a, torch.full((H,), 0.08), rtol=1e-5, atol=0)
    torch.testing.assert_close(norm_b, torch.full((H,), 0.08), rtol=1e-5, atol=0)
    assert torch.equal(model.W_enc_A, model.W_dec_A.T) and torch.equal(model.W_enc_B, model.W_dec_B.T)
    assert model.W_enc_A.data_ptr() != model.W_dec_A.data_ptr()  # tied at init only, not shared
    for name in ("b_enc", "b_dec_A", "b_dec_B"):
        assert torch.count_nonzero(getattr(model, name)) == 0


def test_build_is_seeded() -> None:
    assert torch.equal(make(seed=3).W_dec_B, make(seed=3).W_dec_B)
    assert not torch.equal(make(seed=3).W_dec_B, make(seed=4).W_dec_B)


def test_loss_equals_hand_computation() -> None:
    model = make(seed=1)
    with torch.no_grad():  # non-trivial biases so every term matters
        for name in ("b_enc", "b_dec_A", "b_dec_B"):
            getattr(model, name).normal_(0, 0.1)
    x_a, x_b = batch(9, seed=2)
    x_a64, x_b64 = x_a.double(), x_b.double()
    P = {n: getattr(model, n).detach().double() for n in crosscoder.PARAM_NAMES}
    f = torch.zeros(9, H, dtype=torch.float64)
    for n in range(9):  # latent by latent, as the paper writes it
        for h in range(H):
            pre = (x_a64[n] * P["W_enc_A"][:, h]).sum() + (x_b64[n] * P["W_enc_B"][:, h]).sum() + P["b_enc"][h]
            f[n, h] = max(pre.item(), 0.0)
    xhat_a = f @ P["W_dec_A"] + P["b_dec_A"]
    xhat_b = f @ P["W_dec_B"] + P["b_dec_B"]
    mse_a = ((xhat_a - x_a64) ** 2).sum(1).mean()
    mse_b = ((xhat_b - x_b64) ** 2).sum(1).mean()
    dec_norms = P["W_dec_A"].norm(dim=1) + P["W_dec_B"].norm(dim=1)
    sparsity = (f * dec_norms).sum(1).mean()
    l0 = (f > 0).sum(1).double().mean()

    parts = model.loss(x_a, x_b, l1_coeff=0.7)
    torch.testing.assert_close(parts.mse_a.double(), mse_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.mse_b.double(), mse_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.sparsity.double(), sparsity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.total.double(), mse_a + mse_b + 0.7 * sparsity, rtol=1e-5, atol=1e-6)
    assert parts.l0.item() == pytest.approx(l0.item())
    assert 0 < parts.l0.item() < H


def test_gradients_reach_every_parameter() -> None:
    model = make(seed=0)
    with torch.no_grad():
        model.b_enc.fill_(0.05)
    x_a, x_b = batch(32)
    model.loss(x_a, x_b, l1_coeff=1.0).total.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    stored = {crosscoder.ENCODER_STORAGE.get(n, n) for n in crosscoder.PARAM_NAMES}
    assert {n for n, _ in model.named_parameters()} == stored  # each public tensor stored once


def test_encoders_are_stored_latent_by_latent() -> None:
    """W_enc_A is a [A, H] view of a contiguous [H, A] parameter; saving and loading see the view."""
    model = make(seed=0)
    assert model.W_enc_HA.is_contiguous() and model.W_enc_HA.shape == (H, D_A)
    assert model.W_enc_A.shape == (D_A, H) and model.W_enc_A.data_ptr() == model.W_enc_HA.data_ptr()
    assert model.stored("W_enc_B") is model.W_enc_HB and model.stored("b_enc") is model.b_enc
    assert model.as_named("W_enc_B", model.W_enc_HB).shape == (D_B, H)
    assert model.as_named("b_enc", model.b_enc) is model.b_enc
    assert torch.equal(model.state_tensors()["W_enc_B"], model.W_enc_HB.detach().T)


@pytest.mark.parametrize("kwargs, needle", [
    ({"d_a": 0}, "crosscoder.d_a: 0 is not a positive integer"),
    ({"dict_size": 2.5}, "crosscoder.dict_size: 2.5 is not a positive integer"),
    ({"architecture": "topk"}, "crosscoder.architecture: 'topk' is unknown; accepted: "),
])
def test_config_validation(kwargs, needle) -> None:
    with pytest.raises(ValueError) as err:
        CrosscoderConfig(**dict(dict(d_a=4, d_b=4), **kwargs))
    assert needle in str(err.value)


# -- save / load -----------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(tmp_path) -> None:
    model = make(seed=5, dec_init_norm=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([crosscoder.WEIGHTS_FILE, crosscoder.CONFIG_FILE])
    loaded = crosscoder.load(tmp_path)
    assert type(loaded) is type(model) and asdict(loaded.cfg) == asdict(model.cfg)
    for name in crosscoder.PARAM_NAMES:
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    x_a, x_b = batch(4)
    assert torch.equal(loaded(x_a, x_b)[0], model(x_a, x_b)[0])


@pytest.mark.parametrize("damage, needle", [
    (lambda t: t.pop("b_enc"), "missing tensors ['b_enc']"),
    (lambda t: t.pop("W_dec_B"), "missing tensors ['W_dec_B']"),
    (lambda t: t.update(W_enc_B=torch.zeros(D_B + 1, H)), f"tensor W_enc_B has shape ({D_B + 1}, {H}), "
                                                          f"expected ({D_B}, {H})"),
    (lambda t: t.update(b_dec_A=torch.zeros(1)), "tensor b_dec_A has shape (1,)"),
])
def test_damaged_weights_name_the_tensor(damage, needle, tmp_path) -> None:
    model = make()
    model.save(tmp_path)
    tensors = io.load_tensors(tmp_path / crosscoder.WEIGHTS_FILE)
    damage(tensors)
    io.save_tensors(tmp_path / crosscoder.WEIGHTS_FILE, tensors)
    with pytest.raises(io.ArtifactError) as err:
        crosscoder.load(tmp_path)
    assert needle in str(err.value) and crosscoder.WEIGHTS_FILE in str(err.value)


class _Payload:
    """Unpickling this would create `marker`: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_renamed_to_safetensors_is_refused_without_unpickling(tmp_path, monkeypatch) -> None:
    model = make()
    model.save(tmp_path)
    marker = tmp_path / "pwned"
    weights = tmp_path / crosscoder.WEIGHTS_FILE
    torch.save(model.state_tensors(), weights)  # a real torch checkpoint under the safetensors name
    used = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: used.append(a) or pytest.fail("torch.load used"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: used.append(a) or pytest.fail("pickle.load used"))
    with pytest.raises(io.ArtifactError, match="corrupt or not a safetensors file"):
        crosscoder.load(tmp_path)
    weights.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(io.ArtifactError, match="corrupt or not a safetensors file"):
        crosscoder.load(tmp_path)
    assert not used and not marker.exists()


def test_truncated_weights_and_missing_config(tmp_path) -> None:
    model = make()
    model.save(tmp_path)
    weights = tmp_path / crosscoder.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(io.ArtifactError, match="corrupt or not a safetensors file"):
        crosscoder.load(tmp_path)
    (tmp_path / crosscoder.CONFIG_FILE).unlink()
    with pytest.raises(io.ArtifactError, match="file not found"):
        crosscoder.load(tmp_path)
