"""fused_loss: the hand-written dense and sparse steps give Crosscoder.loss's value and gradients."""

from __future__ import annotations

import pytest
import torch

from hidden_signatures.crosscoders import crosscoder as cc
from hidden_signatures.crosscoders import fused_loss
from hidden_signatures.crosscoders import dfc

DENSE, SPARSE = 0.0, 1.0  # sparse_below: never / always sparse


def model_and_batch(bias: float = -0.3, seed: int = 1):
    """A small crosscoder of unequal widths whose latents fire on about a fifth of the pairs."""
    m = cc.build(cc.CrosscoderConfig(d_a=24, d_b=32, dict_size=256), seed=seed)
    with torch.no_grad():
        m.b_enc.fill_(bias)
    gen = torch.Generator().manual_seed(seed)
    return m, torch.randn(64, 24, generator=gen), 2 * torch.randn(64, 32, generator=gen)


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    parts = fn()
    parts.total.backward()
    return parts, {name: model.as_named(name, model.stored(name).grad).clone() for name in cc.PARAM_NAMES}


@pytest.mark.parametrize("sparse_below", [DENSE, SPARSE], ids=["dense", "sparse"])
def test_fp32_value_and_gradients_equal_autograd(sparse_below) -> None:
    m, xa, xb = model_and_batch()
    ref, g_ref = loss_and_grads(m, lambda: m.loss(xa, xb, 0.7))
    got, g_got = loss_and_grads(m, lambda: fused_loss.loss(m, xa, xb, 0.7, torch.float32, sparse_below))
    assert 0 < ref.l0.item() < 0.5 * 256
    for field in ("total", "mse_a", "mse_b", "sparsity", "l0"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.fired, ref.fired)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_got[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("sparse_below", [DENSE, SPARSE], ids=["dense", "sparse"])
def test_bf16_gradients_are_close_to_autocast_autograd(sparse_below) -> None:
    m, xa, xb = model_and_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, g_ref = loss_and_grads(m, lambda: m.loss(xa, xb, 0.7))
    got, g_got = loss_and_grads(m, lambda: fused_loss.loss(m, xa, xb, 0.7, torch.bfloat16, sparse_below))
    torch.testing.assert_close(got.total, ref.total, rtol=2e-2, atol=0)
    for name, g in g_ref.items():
        cos = torch.nn.functional.cosine_similarity(g_got[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())


def test_sparse_and_dense_agree_on_a_sparse_batch() -> None:
    m, xa, xb = model_and_batch(bias=-1.5)
    dense, g_dense = loss_and_grads(m, lambda: fused_loss.loss(m, xa, xb, 0.3, torch.float32, DENSE))
    sparse, g_sparse = loss_and_grads(m, lambda: fused_loss.loss(m, xa, xb, 0.3, torch.float32, SPARSE))
    assert dense.l0.item() < 10
    torch.testing.assert_close(sparse.total, dense.total)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_latent_fires() -> None:
    """A batch with nothing active: only the decoder biases get a gradient, on both paths."""
    m, xa, xb = model_and_batch(bias=-1e4)
    for sparse_below in (DENSE, SPARSE):
        parts, grads = loss_and_grads(m, lambda: fused_loss.loss(m, xa, xb, 0.5, torch.float32, sparse_below))
        assert parts.l0.item() == 0 and not parts.fired.any()
        assert grads["W_enc_A"].abs().max() == 0 and grads["W_dec_B"].abs().max() == 0
        torch.testing.assert_close(grads["b_dec_A"], 2 * (m.b_dec_A - xa).mean(0).detach())


def test_path_follows_the_density_threshold(monkeypatch) -> None:
    m, xa, xb = model_and_batch()
    built = []
    real = fused_loss._Sparse
    monkeypatch.setattr(fused_loss, "_Sparse", lambda f: built.append(f.shape) or real(f))
    density = fused_loss.loss(m, xa, xb, 0.5, sparse_below=0.0).l0.item() / 256
    assert built == []
    fused_loss.loss(m, xa, xb, 0.5, sparse_below=density * 1.01)
    assert built == [(64, 256)]
    fused_loss.loss(m, xa, xb, 0.5, sparse_below=density * 0.99)
    assert len(built) == 1


def test_the_params_default_is_the_fused_step_with_a_measured_threshold() -> None:
    from hidden_signatures.crosscoders import sparse_probe
    from hidden_signatures.crosscoders.train_config import TrainConfig

    assert TrainConfig.sparse_below == sparse_probe.AUTO and TrainConfig.step == "fused"


def test_sparse_step_is_bit_identical_when_repeated() -> None:
    m, xa, xb = model_and_batch()
    _, g1 = loss_and_grads(m, lambda: fused_loss.loss(m, xa, xb, 0.7, torch.float32, SPARSE))
    _, g2 = loss_and_grads(m, lambda: fused_loss.loss(m, xa, xb, 0.7, torch.float32, SPARSE))
    assert all(torch.equal(g1[n], g2[n]) for n in g1)


def test_only_the_plain_crosscoder_is_fused() -> None:
    cfg = dict(d_a=8, d_b=8, dict_size=32)
    assert fused_loss.supports(cc.build(cc.CrosscoderConfig(**cfg)))
    assert not fused_loss.supports(cc.build(cc.CrosscoderConfig(**cfg, architecture="batchtopk", k=4)))
    assert not fused_loss.supports(dfc.DedicatedFeatureCrosscoder(
        cc.CrosscoderConfig(**cfg, architecture="dfc", dfc_sizes={"a_only": 4, "b_only": 4})))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_relu_leaves_zeros_whose_bits_count_what_fired(dtype) -> None:
    """relu_ zeroes -0.0 to +0.0 (Tensor.relu_ keeps its sign) and keeps NaN, vectorized part and tail,
    so counting and finding f's nonzero integer bits finds exactly the latents that fired."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 101, generator=gen).to(dtype)
    x[x.abs() < 0.3] = -0.0
    x[0, :3] = float("nan")
    f = fused_loss.relu_(x.clone())
    assert torch.equal(f.isnan(), x.isnan())
    fired = (f > 0) | f.isnan()
    assert 0 < int(torch.count_nonzero(fused_loss.fired_bits(f))) == int(fired.sum())
    assert torch.equal(fused_loss.fired_bits(f).view(-1).nonzero(), fired.view(-1).nonzero())
    assert torch.equal(f.nan_to_num(), torch.relu(x).nan_to_num())
    assert int(torch.count_nonzero(fused_loss.fired_bits(x.clone().relu_()))) > int(fired.sum())  # why not relu_


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, block_columns", [((1000, 3000), None), ((512, 1000), 64), ((3, 130), 64),
                                                  ((4096, 700), 128)])
def test_column_sums_are_torchs_sums_bit_for_bit(shape, block_columns, threads, monkeypatch) -> None:
    """The blocked fp32 column sums of a bf16 matrix are torch.sum(dtype=float32)'s bits, with many
    blocks and a ragged last one, on one thread and on two. Blocks must be whole vectors: at (1000,
    3000) the unrounded block (1048 columns) puts a vector tail inside, whose columns sum otherwise."""
    if block_columns:
        monkeypatch.setattr(fused_loss, "COLUMN_BLOCK_BYTES", block_columns * 4 * shape[0])
    gen = torch.Generator().manual_seed(1)
    t = (torch.randn(*shape, generator=gen) * 3).relu().bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, torchs = fused_loss.column_sums(t), torch.sum(t, 0, dtype=torch.float32)
    finally:
        torch.set_num_threads(before)
    assert ours.dtype == torch.float32 and torch.equal(ours.view(torch.int32), torchs.view(torch.int32))
