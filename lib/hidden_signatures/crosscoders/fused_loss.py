"""The ReLU+L1 crosscoder's loss with a hand-written backward: dense, or sparse over the latents that fired.

Crosscoder.loss through autograd pays, per step, for every latent of every token in ten matmuls
and a dozen [N, H] elementwise passes. Here the backward is written out: no pre-activations kept,
the L1 term's gradient folded into the addmm of the decoder's, one threshold pass for the ReLU,
weights cast once. Once few latents fire, the decoder, the decoder-weighted L1 and every weight
gradient are computed only at the fired (token, latent) pairs (embedding bags per token and per
latent, and an SDDMM), so only the encoder's forward stays dense.

Both paths give Crosscoder.loss's value and gradients to float tolerance (tests/test_fused_loss.py).
Which path a batch takes is a pure function of that batch's latents (`sparse_below`), so reruns
and resumed runs take the same paths and stay bit-identical.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .crosscoder import Crosscoder, LossParts

SPARSE_BELOW = 0.05
"""This function's default and BatchTopK's: a batch whose share of active (token, latent) pairs is
below this takes the sparse path. The trainer's `train.sparse_below: auto` measures the crossover
on the machine instead (sparse_probe.py; README, Speed)."""


STEP_VERSION = 4
"""Raised when either path's speed changes (2: the sparse backward runs latent-major, no weight-sized
transposes or casts; 3: fired latents counted and found on the integer bits of f; 4: the dense
path's column sums in cache-sized blocks), so sparse_probe's cached crossovers of an older step are
measured again. Not for the encoders stored latent by latent (crosscoder.py), which sped both paths
alike (dense 1.07x, sparse 1.05x, AMD EPYC, docs/speed.md): their crossover, and with it every
cached result, stands."""

COLUMN_BLOCK_BYTES = 4 << 20
"""`column_sums` casts this many bytes of fp32 at a time: within a core's share of the L3 cache."""

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def relu_(t: torch.Tensor) -> torch.Tensor:
    """ReLU in place that writes +0.0 wherever it zeroes (Tensor.relu_ keeps a -0.0 input's sign) and
    keeps NaN, so a zero of its output is all-zero bits and `fired_bits` may count on them."""
    return F.threshold_(t, 0.0, 0.0)


def fired_bits(f: torch.Tensor) -> torch.Tensor:
    """f's integer view, nonzero exactly where f is (f from `relu_`: no -0.0). count_nonzero and
    nonzero run vectorized on integers: 27x and 2x faster than on bf16 at 4096 x 16384 here."""
    return f.view(_BITS[f.element_size()])


def column_sums(t_NH: torch.Tensor) -> torch.Tensor:
    """fp32 sums over dim 0, bit for bit `torch.sum(t, 0, dtype=torch.float32)`. On CPU that call
    writes the whole of t in fp32 first (268 MB at bf16 [4096, 16384]) and reads it back; here a
    cache-sized block of whole 64-column vectors is cast and summed at a time, each column in the
    same order, so the same bits (a vector's tail inside a block would sum in another order), 4x
    faster on the EPYC. CUDA casts inside its reduction and keeps the one call."""
    if t_NH.dtype == torch.float32 or t_NH.dim() != 2 or t_NH.device.type != "cpu":
        return torch.sum(t_NH, 0, dtype=torch.float32)
    N, H = t_NH.shape
    block = max(COLUMN_BLOCK_BYTES // (4 * max(N, 1)) // 64 * 64, 64)  # whole vectors: no tails inside
    out = torch.empty(H, dtype=torch.float32, device=t_NH.device)
    for j in range(0, H, block):
        torch.sum(t_NH[:, j:j + block], 0, dtype=torch.float32, out=out[j:j + block])
    return out


def supports(model: torch.nn.Module) -> bool:
    """True for the plain ReLU+L1 crosscoder (variants change the encoder or decoder and keep autograd)."""
    return type(model) is Crosscoder


def loss(model: Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, l1_coeff: float,
         dtype: torch.dtype = torch.float32, sparse_below: float = SPARSE_BELOW) -> LossParts:
    """Crosscoder.loss's LossParts, computed by the fused function (matmuls in `dtype`)."""
    stats: dict = {}
    total = _FusedLoss.apply(x_NA, x_NB, model.W_enc_A, model.W_enc_B, model.b_enc, model.W_dec_A,
                             model.W_dec_B, model.b_dec_A, model.b_dec_B, float(l1_coeff), dtype,
                             float(sparse_below), stats)
    return LossParts(total=total, mse_a=stats["mse_a"], mse_b=stats["mse_b"], sparsity=stats["sparsity"],
                     l0=stats["l0"], fired=stats["fired"])


class FiredPairs:
    """The fired (token, latent) pairs of f in CSR order (by token): enough to decode over them only.

    `from_relu_`: f came from `relu_` (no -0.0), so the pairs are found on its integer bits."""

    def __init__(self, f_NH: torch.Tensor, from_relu_: bool = False):
        N, H = f_NH.shape
        flat = (fired_bits(f_NH) if from_relu_ else f_NH).view(-1).nonzero().squeeze(1)
        self.shape = (N, H)
        self.row, self.col = flat // H, flat % H
        self.vals = f_NH.view(-1)[flat].float()
        self.crow = row_starts(self.row, N)

    def product(self, vals: torch.Tensor, W_HD: torch.Tensor) -> torch.Tensor:
        """[N, D] = F @ W, F the [N, H] matrix with `vals` at the fired pairs (an embedding bag per token)."""
        return F.embedding_bag(self.col, W_HD, self.crow[:-1], mode="sum", per_sample_weights=vals)


class _Sparse(FiredPairs):
    """The fired pairs by token, and the same pairs by latent (the sparse backward's weight gradients)."""

    def __init__(self, f_NH: torch.Tensor):
        super().__init__(f_NH, from_relu_=True)
        self.by_latent = torch.argsort(self.col, stable=True)
        self.col_T, self.row_T = self.col[self.by_latent], self.row[self.by_latent]  # latent-major
        self.crow_T = row_starts(self.col_T, self.shape[1])

    def bag_T(self, vals_latent_major: torch.Tensor, X_ND: torch.Tensor) -> torch.Tensor:
        """[H, D] = F^T @ X, `vals` in latent-major order (an embedding bag per latent)."""
        return F.embedding_bag(self.row_T, X_ND, self.crow_T[:-1], mode="sum", per_sample_weights=vals_latent_major)


def _csr(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # torch calls its CSR support beta; the products used here are tested
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)


def row_starts(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointers [n_rows + 1] of entries sorted by row: row r's entries are [out[r], out[r + 1])."""
    counts = torch.bincount(sorted_rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


class _FusedLoss(torch.autograd.Function):
    """total = sum_m mean_n |xhat_m - x_m|^2 + l1 * mean_n sum_i f_ni (|d_Ai| + |d_Bi|), f = relu(enc)."""

    @staticmethod
    def forward(ctx, x_NA, x_NB, W_enc_A, W_enc_B, b_enc, W_dec_A, W_dec_B, b_dec_A, b_dec_B,
                l1, dtype, sparse_below, stats):
        N = x_NA.shape[0]
        xc = (x_NA.to(dtype), x_NB.to(dtype))
        f_NH = torch.addmm(b_enc.to(dtype), xc[0], W_enc_A.to(dtype))
        relu_(f_NH.addmm_(xc[1], W_enc_B.to(dtype)))
        norms = (W_dec_A.detach().norm(dim=1), W_dec_B.detach().norm(dim=1))
        nnz = int(torch.count_nonzero(fired_bits(f_NH)))
        sparse = _Sparse(f_NH) if nnz < sparse_below * f_NH.numel() else None
        W_dec = (W_dec_A.to(dtype), W_dec_B.to(dtype))
        if sparse is None:
            xhat = [(f_NH @ W).float() for W in W_dec]
            f_sum_H = column_sums(f_NH)
            fired = f_sum_H > 0  # f >= 0 after the ReLU, so its sum is positive exactly where one fired
        else:
            xhat = [sparse.product(sparse.vals.to(dtype), W).float() for W in W_dec]
            fired = torch.bincount(sparse.col, minlength=f_NH.shape[1]) > 0
            f_sum_H = torch.zeros(f_NH.shape[1], device=f_NH.device).index_add_(0, sparse.col, sparse.vals)
            f_NH = None
        err = [xh + b - x.float() for xh, b, x in zip(xhat, (b_dec_A, b_dec_B), (x_NA, x_NB))]
        mse_a, mse_b = (e.pow(2).sum() / N for e in err)
        sparsity = f_sum_H @ (norms[0] + norms[1]) / N
        stats.update(mse_a=mse_a, mse_b=mse_b, sparsity=sparsity, fired=fired,
                     l0=torch.tensor(nnz / N, dtype=torch.float32))
        ctx.save_for_backward(*xc, f_NH, *err, *norms, f_sum_H, W_dec_A, W_dec_B, *W_dec)
        ctx.sparse, ctx.l1, ctx.dtype = sparse, l1, dtype
        return mse_a + mse_b + l1 * sparsity

    @staticmethod
    def backward(ctx, grad_total):
        xa, xb, f_NH, err_a, err_b, norm_a, norm_b, f_sum_H, W_dec_A, W_dec_B, *W_dec = ctx.saved_tensors
        N = xa.shape[0]
        go = grad_total.float()
        g = (err_a * (2 * go / N), err_b * (2 * go / N))  # d total / d xhat, per model
        l1_H = (go * ctx.l1 / N) * (norm_a + norm_b)  # d total / d f_ni, from the L1 term
        if ctx.sparse is None:
            dW_enc, db_enc_H, dW_dec = _dense_backward((xa, xb), f_NH, W_dec, g, l1_H, ctx.dtype)
        else:
            dW_enc, db_enc_H, dW_dec = _sparse_backward(ctx.sparse, (xa, xb), (W_dec_A, W_dec_B), g, l1_H,
                                                        ctx.dtype)
        # the L1 term's pull on the decoder norms: l1 / N * sum_n f_ni * d_i / |d_i|
        scale_H = (go * ctx.l1 / N) * f_sum_H
        pull = [(scale_H / norm.clamp_min(1e-12))[:, None] for norm in (norm_a, norm_b)]
        if ctx.sparse is None:
            dW_dec_A = dW_dec[0].float() + W_dec_A * pull[0]
            dW_dec_B = dW_dec[1].float() + W_dec_B * pull[1]
        else:  # fp32 already and ours: one in-place pass instead of a cast, a product and a sum
            dW_dec_A, dW_dec_B = dW_dec[0].addcmul_(W_dec_A, pull[0]), dW_dec[1].addcmul_(W_dec_B, pull[1])
        return (None, None, dW_enc[0].float(), dW_enc[1].float(), db_enc_H, dW_dec_A, dW_dec_B,
                g[0].sum(0), g[1].sum(0), None, None, None, None)


def _dense_backward(xc, f_NH, W_dec, g, l1_H, dtype):
    """Gradients for (W_enc_A, W_enc_B), b_enc, (W_dec_A, W_dec_B), every latent of every token; the
    encoders' computed latent-major, the layout they are stored in (the same bits as x^T @ g)."""
    gc = [gm.to(dtype) for gm in g]
    dW_dec = [f_NH.T @ gm for gm in gc]
    g_NH = torch.addmm(l1_H.to(dtype), gc[0], W_dec[0].T).addmm_(gc[1], W_dec[1].T)
    g_NH = torch.ops.aten.threshold_backward(g_NH, f_NH, 0)  # zero where the latent did not fire
    return [(g_NH.T @ x).T for x in xc], column_sums(g_NH), dW_dec


def _sparse_backward(sp: _Sparse, xc, W_dec, g, l1_H, dtype):
    """The same gradients from the fired pairs only: SDDMM for d f, embedding bags for the weights.

    Everything runs in the latent-major order of the fired pairs, so the SDDMM reads the decoder as
    stored ([H, D] @ g^T [D, N]) and no weight-sized tensor is transposed; the decoder gradients come
    out in fp32 (no weight-sized cast), and the encoder gradients latent-major as the encoders are
    stored (Crosscoder.W_enc_HA), so they need no transposing copy either."""
    N, H = sp.shape
    pattern = _csr(sp.crow_T, sp.row_T, torch.zeros_like(sp.vals), (H, N))
    g_vals = l1_H[sp.col_T]  # d total / d f at the fired pairs, latent-major: the L1 term
    for gm, W in zip(g, W_dec):  # ... plus g_n . d_i
        g_vals += torch.sparse.sampled_addmm(pattern, W.detach(), gm.T.contiguous()).values()
    vals = sp.vals[sp.by_latent]
    dW_dec = [sp.bag_T(vals, gm) for gm in g]
    dW_enc = [sp.bag_T(g_vals.to(dtype), x).float().T for x in xc]
    db_enc_H = torch.zeros_like(l1_H).index_add_(0, sp.col_T, g_vals)
    return dW_enc, db_enc_H, dW_dec

