"""Tests for the BatchTopK and dedicated-feature crosscoders and exclusive_agreement."""

from __future__ import annotations

import pytest
import torch

from hidden_signatures.crosscoders import batchtopk, crosscoder, dfc, fused_loss
from hidden_signatures.crosscoders.crosscoder import CrosscoderConfig

D_A, D_B = 16, 12


def make_cfg(**overrides) -> CrosscoderConfig:
    """A tiny valid config; one override per test."""
    base = dict(d_a=D_A, d_b=D_B, dict_size=48, architecture="batchtopk", k=4, aux_k=8)
    base.update(overrides)
    return CrosscoderConfig(**base)


def random_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_A, generator=gen), torch.randn(n, D_B, generator=gen)


def sparse_feature_batch(n: int, n_features: int = 32, per_token: int = 3,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that are sums of `per_token` random ground-truth features, paired across A and B."""
    gen = torch.Generator().manual_seed(seed)
    dirs_A = torch.nn.functional.normalize(torch.randn(n_features, D_A, generator=gen), dim=1)
    dirs_B = torch.nn.functional.normalize(torch.randn(n_features, D_B, generator=gen), dim=1)
    idx = torch.rand(n, n_features, generator=gen).argsort(dim=1)[:, :per_token]
    coef = torch.zeros(n, n_features).scatter(1, idx, 1.0 + torch.rand(n, per_token, generator=gen))
    return coef @ dirs_A, coef @ dirs_B


def train(model: crosscoder.Crosscoder, x_a: torch.Tensor, x_b: torch.Tensor,
          steps: int, lr: float = 1e-2, l1_coeff: float = 0.0) -> None:
    """Full-batch Adam steps, calling post_step as the trainer will."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model.loss(x_a, x_b, l1_coeff).total.backward()
        opt.step()
        model.post_step()


def test_variants_are_registered() -> None:
    assert crosscoder.ARCHITECTURES["batchtopk"] is batchtopk.BatchTopKCrosscoder
    assert crosscoder.ARCHITECTURES["dfc"] is dfc.DedicatedFeatureCrosscoder
    assert isinstance(crosscoder.build(make_cfg(), seed=1), batchtopk.BatchTopKCrosscoder)


# -- BatchTopK ---------------------------------------------------------------------------------
def test_batchtopk_keeps_exactly_k_times_batch_in_training() -> None:
    model = crosscoder.build(make_cfg(), seed=0).train()
    x_a, x_b = random_batch(64)
    f, xhat_a, xhat_b = model(x_a, x_b)
    assert int((f != 0).sum()) == 4 * 64
    assert xhat_a.shape == x_a.shape and xhat_b.shape == x_b.shape
    # the kept entries are the largest decoder-norm-scaled activations
    relu, scaled = model.scaled_acts(x_a, x_b)
    assert scaled[f > 0].min() >= scaled[f == 0].max()
    assert torch.equal(f[f > 0], relu[f > 0])


def test_batchtopk_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="crosscoder.k"):
        crosscoder.build(make_cfg(k=49))
    with pytest.raises(ValueError, match="crosscoder.aux_k"):
        crosscoder.build(make_cfg(aux_k=0))


def test_threshold_reproduces_training_sparsity() -> None:
    model = crosscoder.build(make_cfg(dict_size=64, k=4), seed=0)
    x_a, x_b = sparse_feature_batch(256, per_token=4)  # k real features per token
    assert float(model.threshold) < 0  # not estimated before training
    train(model, x_a, x_b, steps=300, lr=5e-3)
    assert float(model.threshold) > 0
    model.eval()
    with torch.no_grad():
        f = model.encode(x_a, x_b)
        l0_eval = float((f > 0).float().sum(-1).mean())
        parts = model.loss(x_a, x_b)
    assert abs(l0_eval - 4) <= 0.2 * 4, l0_eval
    total_var = (x_a - x_a.mean(0)).pow(2).sum(-1).mean()
    assert float(parts.mse_a) < 0.5 * float(total_var)  # it learned something


def test_eval_mode_update_does_not_touch_statistics() -> None:
    model = crosscoder.build(make_cfg(), seed=0)
    x_a, x_b = random_batch(32)
    model.train()
    with torch.no_grad():
        model.loss(x_a, x_b)
    assert float(model.threshold) == -1.0 and int(model.num_tokens_since_fired.sum()) == 0
    model.loss(x_a, x_b)
    assert float(model.threshold) > 0
    assert int(model.num_tokens_since_fired.max()) == 32


def test_aux_loss_positive_only_with_dead_latents() -> None:
    model = crosscoder.build(make_cfg(), seed=0).train()
    x_a, x_b = random_batch(64)
    with torch.no_grad():
        none_dead = model.loss(x_a, x_b)
    assert float(none_dead.aux) == 0.0
    assert torch.allclose(none_dead.total, none_dead.mse_a + none_dead.mse_b)

    with torch.no_grad():  # latents 0..9 stay active under ReLU but lose every top-k contest
        model.W_dec_A[:10] *= 1e-3
        model.W_dec_B[:10] *= 1e-3
    model.dead_after_tokens = 1000
    model.num_tokens_since_fired[:10] = 5000
    parts = model.loss(x_a, x_b)
    assert torch.equal(model.dead_mask()[:10], torch.ones(10, dtype=torch.bool))
    assert int(model.dead_mask().sum()) == 10
    assert float(parts.aux) > 0
    assert torch.allclose(parts.total, parts.mse_a + parts.mse_b + model.cfg.aux_coeff * parts.aux)
    model.zero_grad()
    (parts.total - parts.mse_a - parts.mse_b).backward()  # the aux term with its graph
    grad_rows = model.W_dec_A.grad.norm(dim=1)
    assert grad_rows[:10].sum() > 0 and grad_rows[10:].sum() == 0  # only dead latents learn



def reference_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Plain reference: a stable descending sort's first n_keep flat indices (ties: lowest first)."""
    return scores.flatten().sort(descending=True, stable=True).indices[:n_keep].sort().values


def tied_scores(n: int, h: int, seed: int) -> torch.Tensor:
    """ReLU'd bf16-rounded activations times per-latent norms: zeros and exact ties, as in training."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n, h, generator=gen)).bfloat16().float()
    return acts * torch.rand(h, generator=gen).bfloat16().float()


SELECTION_CASES = [  # (scores, n_keep): realistic, heavy ties, all kept, fewer positives than kept
    (tied_scores(512, 4096, 0), 32 * 512),
    (tied_scores(64, 48, 1), 4 * 64),
    (torch.randint(0, 4, (100, 30), generator=torch.Generator().manual_seed(2)).float(), 700),
    (torch.randint(0, 4, (100, 30), generator=torch.Generator().manual_seed(3)).float(), 1),
    (tied_scores(5, 48, 4), 5 * 48),
    (tied_scores(40, 48, 5), 1900),  # ~960 positive entries: the cut is at 0
]


@pytest.mark.parametrize("case", range(len(SELECTION_CASES)))
def test_top_entries_matches_reference(case: int) -> None:
    scores, n_keep = SELECTION_CASES[case]
    idx = batchtopk.top_entries(scores, n_keep)
    assert torch.equal(idx, reference_top(scores, n_keep))
    # the set of flatten().topk (the former selection) up to which equal values at the cut are kept
    old = scores.flatten().topk(n_keep, sorted=False)
    assert torch.equal(scores.flatten()[idx].sort().values, old.values.sort().values)
    cut = old.values.min()
    assert set(idx[scores.flatten()[idx] > cut].tolist()) == set(old.indices[old.values > cut].tolist())


def test_top_entries_skewed_batch_and_nan() -> None:
    scores = tied_scores(64, 48, 6)
    scores[::batchtopk.SAMPLE_STRIDE] += 100.0  # the sampled rows hold nearly all the top entries
    n_keep = 8 * 64
    assert batchtopk.candidates(scores, n_keep, batchtopk.SAMPLE_STRIDE).numel() == scores.numel()
    assert torch.equal(batchtopk.top_entries(scores, n_keep), reference_top(scores, n_keep))
    scores[7, 3] = float("nan")  # NaN ranks as largest, as in topk
    idx = batchtopk.top_entries(scores, n_keep)
    assert idx.numel() == n_keep and 7 * 48 + 3 in idx.tolist()
    assert batchtopk.top_entries(scores, 0).numel() == 0


def test_batchtopk_loss_matches_plain_formulas() -> None:
    """Selection, statistics and the aux loss against plain [N, H] computations (the former code)."""
    model = crosscoder.build(make_cfg(dict_size=64, aux_k=6), seed=0).train()
    with torch.no_grad():
        model.b_enc[:8] = -5.0  # 8 latents that never fire but are dead only by their counters
    model.dead_after_tokens = 100
    model.num_tokens_since_fired[:12] = 500
    x_a, x_b = random_batch(64, seed=3)
    relu, scaled = (t.detach() for t in model.scaled_acts(x_a, x_b))
    keep = torch.zeros(relu.numel(), dtype=torch.bool)
    keep[reference_top(scaled, 4 * 64)] = True
    f_ref = relu * keep.view_as(relu)
    parts = model.loss(x_a, x_b)
    dead = model.dead_mask()  # after this batch's counter update, as in the loss
    assert 8 <= int(dead.sum()) < 12  # 0..7 never fire; some of 8..11 did
    f = model.encode(x_a, x_b).detach()
    assert torch.equal(f, f_ref)
    assert torch.equal(parts.fired, (f_ref > 0).any(0))
    assert parts.l0.item() == (f_ref > 0).float().sum(-1).mean().item()
    norms = (model.W_dec_A.norm(dim=1) + model.W_dec_B.norm(dim=1)).detach()
    torch.testing.assert_close(parts.sparsity, (f_ref * norms).sum(-1).mean())
    assert model.threshold.item() == scaled[f_ref > 0].min().item()
    assert torch.equal(model.num_tokens_since_fired == 0, (f_ref > 0).any(0))
    # AuxK: the top aux_k dead latents of each token, ranked over all latents with the live masked out
    idx = scaled.masked_fill(~dead, -torch.inf).topk(6, dim=-1).indices
    aux_f = torch.zeros_like(relu).scatter(-1, idx, relu.gather(-1, idx))
    err = torch.cat([x_a - f_ref @ model.W_dec_A - model.b_dec_A, x_b - f_ref @ model.W_dec_B - model.b_dec_B], -1)
    rec = torch.cat([aux_f @ model.W_dec_A, aux_f @ model.W_dec_B], -1).detach()
    aux_ref = (err - rec).pow(2).sum(-1).mean() / (err - err.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(parts.aux, aux_ref.detach())

# -- dedicated features --------------------------------------------------------------------------
def dfc_cfg(**overrides) -> CrosscoderConfig:
    return make_cfg(architecture="dfc", dict_size=24, dfc_sizes={"a_only": 6, "b_only": 5}, **overrides)


def test_dfc_partition_and_validation() -> None:
    part = crosscoder.build(dfc_cfg()).partition()
    assert part["a_only"].tolist() == list(range(6))
    assert part["b_only"].tolist() == list(range(6, 11))
    assert part["shared"].tolist() == list(range(11, 24))
    assert part["a_only"].dtype == torch.long
    for sizes, match in [({"a_only": 20, "b_only": 5}, "exceeds dict_size"),
                         ({"a_only": -1}, "non-negative"), ({"c_only": 2}, "unknown keys")]:
        with pytest.raises(ValueError, match=match):
            crosscoder.build(make_cfg(architecture="dfc", dict_size=24, dfc_sizes=sizes))


def test_dfc_exclusive_slots_never_cross_models() -> None:
    model = crosscoder.build(dfc_cfg(), seed=0)
    x_a, x_b = random_batch(128, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):  # no post_step: forward masking alone must keep the zeros
        opt.zero_grad()
        model.loss(x_a, x_b, l1_coeff=1.0).total.backward()
        opt.step()
    a_only, b_only, shared = (model.partition()[k] for k in ("a_only", "b_only", "shared"))
    assert torch.all(model.W_dec_B[a_only] == 0) and torch.all(model.W_enc_B[:, a_only] == 0)
    assert torch.all(model.W_dec_A[b_only] == 0) and torch.all(model.W_enc_A[:, b_only] == 0)
    assert not torch.equal(model.W_dec_B[shared], before["W_dec_B"][shared])  # training moved
    assert not torch.equal(model.W_dec_A[a_only], before["W_dec_A"][a_only])

    with torch.no_grad():
        x_a2, x_b2 = random_batch(128, seed=2)
        f = model.encode(x_a, x_b)
        assert torch.equal(model.encode(x_a, x_b2)[:, a_only], f[:, a_only])
        assert torch.equal(model.encode(x_a2, x_b)[:, b_only], f[:, b_only])
        assert not torch.equal(model.encode(x_a, x_b2)[:, shared], f[:, shared])
        only_a = torch.zeros_like(f)
        only_a[:, a_only] = f[:, a_only] + 1.0
        _, xhat_b = model.decode(only_a)
        assert torch.equal(xhat_b, model.b_dec_B.expand_as(xhat_b))
        only_b = torch.zeros_like(f)
        only_b[:, b_only] = f[:, b_only] + 1.0
        xhat_a, _ = model.decode(only_b)
        assert torch.equal(xhat_a, model.b_dec_A.expand_as(xhat_a))


# -- shared behaviour -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_fn", [make_cfg, dfc_cfg], ids=["batchtopk", "dfc"])
def test_save_load_round_trip(tmp_path, cfg_fn) -> None:
    model = crosscoder.build(cfg_fn(), seed=3)
    x_a, x_b = random_batch(64)
    train(model, x_a, x_b, steps=3, l1_coeff=1.0)
    model.save(tmp_path)
    loaded = crosscoder.load(tmp_path)
    assert type(loaded) is type(model)
    saved, restored = model.state_tensors(), loaded.state_tensors()
    assert set(saved) == set(restored) and len(dict(model.named_buffers())) > 0
    for name, tensor in saved.items():
        assert torch.equal(tensor, restored[name]), name
    for name, buf in model.named_buffers():
        assert getattr(loaded, name).dtype == buf.dtype and torch.equal(getattr(loaded, name), buf)
    model.eval(), loaded.eval()
    with torch.no_grad():
        for a, b in zip(model(x_a, x_b), loaded(x_a, x_b)):
            assert torch.equal(a, b)


def test_batchtopk_buffers_survive_round_trip(tmp_path) -> None:
    model = crosscoder.build(make_cfg(), seed=3)
    x_a, x_b = random_batch(4)  # 16 kept activations: some of the 48 latents stay silent
    train(model, x_a, x_b, steps=3)
    assert float(model.threshold) > 0 and int(model.num_tokens_since_fired.max()) > 0
    model.save(tmp_path)
    loaded = crosscoder.load(tmp_path)
    assert float(loaded.threshold) == float(model.threshold)
    assert torch.equal(loaded.num_tokens_since_fired, model.num_tokens_since_fired)


@pytest.mark.parametrize("cfg_fn", [make_cfg, dfc_cfg], ids=["batchtopk", "dfc"])
def test_one_step_lowers_loss(cfg_fn) -> None:
    model = crosscoder.build(cfg_fn(), seed=4).train()
    x_a, x_b = random_batch(128, seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = model.loss(x_a, x_b, 0.1).total
    first.backward()
    opt.step()
    model.post_step()
    with torch.no_grad():
        second = model.loss(x_a, x_b, 0.1).total
    assert float(second) < float(first.detach())


# -- exclusive agreement -------------------------------------------------------------------------
def test_exclusive_agreement_matches_permuted_copy() -> None:
    model = crosscoder.build(dfc_cfg(), seed=0)
    part = model.partition()
    W_A, W_B = model.W_dec_A.detach(), model.W_dec_B.detach()
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    plain_A, plain_B = W_A[perm].clone(), W_B[perm].clone()
    out = dfc.exclusive_agreement(part, W_A, W_B, plain_A, plain_B)
    assert out["n_plain"] == {"a_excl": 6, "b_excl": 5, "shared": 13}
    assert out["matched_fraction"] == {"a_only": 1.0, "b_only": 1.0, "shared": 1.0}
    assert out["confusion"]["a_only"] == {"a_excl": 6, "b_excl": 0, "shared": 0, "unmatched": 0}
    assert out["confusion"]["b_only"] == {"a_excl": 0, "b_excl": 5, "shared": 0, "unmatched": 0}
    assert out["best_cos"]["a_only"].shape == (6, 3)


def test_exclusive_agreement_detects_mismatch() -> None:
    """A plain crosscoder whose copies of the A-only directions are shared latents."""
    model = crosscoder.build(dfc_cfg(), seed=0)
    part = model.partition()
    W_A, W_B = model.W_dec_A.detach(), model.W_dec_B.detach()
    plain_A, plain_B = W_A.clone(), W_B.clone()
    gen = torch.Generator().manual_seed(1)
    plain_B[part["a_only"]] = 2.0 * torch.randn(6, D_B, generator=gen) * W_A[part["a_only"]].norm(dim=1, keepdim=True)
    out = dfc.exclusive_agreement(part, W_A, W_B, plain_A, plain_B)
    assert out["n_plain"]["a_excl"] == 0
    assert out["matched_fraction"]["a_only"] == 0.0  # nothing of the same class exists
    assert out["confusion"]["a_only"]["a_excl"] == 0
    assert out["confusion"]["a_only"]["shared"] + out["confusion"]["a_only"]["unmatched"] == 6
    assert out["matched_fraction"]["b_only"] == 1.0
    with pytest.raises(ValueError, match="thresholds"):
        dfc.exclusive_agreement(part, W_A, W_B, plain_A, plain_B, a_thr=0.1, b_thr=0.9)


def test_batchtopk_sparse_decode_equals_the_dense_one() -> None:
    """decode_active (embedding bags over the kept entries) gives decode(f)'s loss and gradients."""
    x_a, x_b = random_batch(64, seed=5)
    runs = []
    for sparse_below in (0.0, 1.0):  # never / always sparse
        model = crosscoder.build(make_cfg(dict_size=64), seed=2).train()
        model.sparse_below = sparse_below
        parts = model.loss(x_a, x_b)
        parts.total.backward()
        runs.append((parts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (dense, g_dense), (sparse, g_sparse) = runs
    torch.testing.assert_close(sparse.total, dense.total)
    assert sparse.l0.item() == dense.l0.item() == 4
    for name, grad in g_dense.items():
        torch.testing.assert_close(g_sparse[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert batchtopk.BatchTopKCrosscoder.sparse_below == fused_loss.SPARSE_BELOW


def test_decoder_init_norm_is_the_architectures_unless_named() -> None:
    """BatchTopK starts its decoder rows at 0.5 (ranking by f * norm kills latents that start small),
    the ReLU + L1 crosscoder at the paper's 0.08; a named value wins, and a params variant inherits "unset"."""
    from hidden_signatures.run.params import CrosscoderSettings
    norms = {arch: crosscoder.build(make_cfg(architecture=arch), 0).decoder_norms()[0]
             for arch in ("relu_l1", "batchtopk")}
    assert torch.allclose(norms["relu_l1"], torch.full_like(norms["relu_l1"], 0.08))
    assert torch.allclose(norms["batchtopk"], torch.full_like(norms["batchtopk"], 0.5))
    named = crosscoder.build(make_cfg(architecture="batchtopk", dec_init_norm=0.1), 0).decoder_norms()[0]
    assert torch.allclose(named, torch.full_like(named, 0.1))
    assert CrosscoderSettings().dec_init_norm is None
    with pytest.raises(Exception, match="crosscoder.dec_init_norm"):
        CrosscoderSettings(dec_init_norm=-1.0)
