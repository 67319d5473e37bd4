"""Speed benchmarks: our harvest and training against the original's approach, as same-run ratios.

Every reported number is a ratio of two timings taken in one process on the same tokens or
tensors, interleaved round-robin after a warm-up (median of repeats), so a busy machine slows
both sides alike. Each ratio entry reads: ratio = baseline_s / ours_s (> 1: ours is faster).

"Ours" runs in the precision `dtype: auto` picks on this machine (`precision.resolve("auto",
"cpu")`: bf16 on a CPU with AMX / AVX512-BF16, fp32 on an AVX2-only one), and every bound (bare
matmuls, plain forward) is taken in that same precision.

    python -m benchmarks.run [--quick] [--out DIR] [--name STEM] [--only PARTS] [--emulate-avx2]

writes DIR/STEM.json and DIR/STEM.md (default: this folder, results) and prints the table.
--emulate-avx2 reruns it with oneDNN, MKL and torch held to AVX2 (an approximation of an
AVX2-only CPU; default STEM results-avx2-emulated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from hidden_signatures import activations, io, models, precision
from hidden_signatures import crosscoder as cc_mod
from hidden_signatures import train as train_mod
from hidden_signatures.params import TrainConfig

RESULTS_STEM = "results"
RESULTS_JSON = f"{RESULTS_STEM}.json"
RESULTS_MD = f"{RESULTS_STEM}.md"
L1_COEFF = 2.0
"""The params default; only the loss value depends on it, not the work done."""
BENCH_LR = 1e-6
"""Learning rate of the repeated step benchmark: tiny, so weights (and sparsity) barely drift."""
RAW_SCALE = 3.0
"""Per-dimension std of the synthetic stores' raw rows (the store's norm factor rescales them)."""
STORE_LAYER = 0
PARTS = ("matmul", "harvest", "training step", "end to end", "growth")
EMULATE_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""Environment that holds torch's kernels, oneDNN and MKL to AVX2: an approximation of an AVX2-only
CPU on an AMX one (harsher on bf16, which it emulates about 40x slower than fp32, than a real one's 4x)."""
EMULATED_STEM = "results-avx2-emulated"
SHORT = {"bfloat16": "bf16", "float32": "fp32"}


@dataclass
class BenchConfig:
    """Sizes of every benchmark; `quick()` shrinks them all."""

    model: str = "smollm2-135m"
    """Model spec (packaged name or HF directory) for the harvest and end-to-end benchmarks."""
    layer: str | int = "middle"
    """Layer read (resid_pre of this block), as in params files."""
    harvest_seqs: int = 16
    """Sequences per forward pass (also the harvest batch size end to end)."""
    seq_len: int = 256
    """Tokens per sequence."""
    repeats: int = 3
    """Timed repeats per measurement (median reported), after one warm-up."""
    harvest_repeats: int = 7
    """Timed repeats of the harvest benchmark (cheap, and its limit ratio is an acceptance figure)."""
    d_a: int = 576
    """Width of model A in the training-step benchmark (SmolLM2-135M)."""
    d_b: int = 640
    """Width of model B in the training-step benchmark (Gemma-3-270M)."""
    dict_size: int = 16384
    """Latents in the training-step benchmark (the paper's 2**14)."""
    batch_size: int = 4096
    """Tokens per training step in the training-step benchmark."""
    trained_l0: int = 128
    """Active latents per token for the sparse-decoder comparison (a trained crosscoder's L0)."""
    compile: bool = True
    """Also time torch.compile of the loss (costs tens of seconds of compilation)."""
    e2e_tokens: int = 20_000
    """Harvested tokens end to end."""
    e2e_steps: int = 100
    """Training steps end to end."""
    e2e_batch: int = 1024
    """Tokens per training step end to end and in the growth benchmarks."""
    e2e_dict: int = 4096
    """Latents end to end and in the growth benchmarks."""
    growth_steps: tuple[int, ...] = (50, 100, 200)
    """Training budgets (steps) whose seconds per step should be constant."""
    store_rows: tuple[int, int] = (100_000, 800_000)
    """Rows of the small and the large synthetic store for the peak-memory comparison."""
    memory_steps: int = 100
    """Training steps run on each store for the peak-memory comparison."""
    run_matmul: tuple[int, int, int] = (512, 576, 4096)
    """(batch, d, H) of the default run's encoder matmul (SmolLM2's 576, train.batch_size 512,
    dict_size 4096), timed in bf16 and fp32; the paper shape (batch_size, d_a, dict_size) too."""
    matmul_call_s: float = 0.2
    """A timed matmul call repeats the product until it takes about this long (steadier timings)."""
    bf16_budget_s: float = 60.0
    """Where bf16 is not the chosen precision (it is emulated): a bf16-only measurement whose single
    call is estimated (from the timed bf16 matmul) to take longer than this is recorded as not timed."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("harvest_seqs", "seq_len", "repeats", "harvest_repeats", "d_a", "d_b", "dict_size",
                     "batch_size", "trained_l0", "e2e_tokens", "e2e_steps", "e2e_batch", "e2e_dict", "memory_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"bench.{name}: {value!r} is not a positive integer")
        if self.seq_len < 2:
            raise ValueError(f"bench.seq_len: {self.seq_len} must be at least 2 (position 0 is skipped)")
        if self.trained_l0 > self.dict_size:
            raise ValueError(f"bench.trained_l0: {self.trained_l0} exceeds dict_size {self.dict_size}")
        if len(self.growth_steps) < 2 or list(self.growth_steps) != sorted(set(self.growth_steps)) \
                or min(self.growth_steps) <= 0:
            raise ValueError(f"bench.growth_steps: {self.growth_steps!r} must be >= 2 increasing positive ints")
        if len(self.store_rows) != 2 or not 0 < self.store_rows[0] < self.store_rows[1]:
            raise ValueError(f"bench.store_rows: {self.store_rows!r} must be (small, large), 0 < small < large")
        if len(self.run_matmul) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                for v in self.run_matmul):
            raise ValueError(f"bench.run_matmul: {self.run_matmul!r} must be three positive ints (batch, d, H)")
        for name in ("matmul_call_s", "bf16_budget_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"bench.{name}: {value!r} is not a positive number")

    def quick(self) -> "BenchConfig":
        """The same benchmarks at sizes that run in a minute or two on two cores."""
        return replace(self, harvest_seqs=8, dict_size=4096, batch_size=2048, trained_l0=64, compile=False,
                       e2e_tokens=2000, e2e_steps=10, e2e_batch=512, e2e_dict=2048, growth_steps=(5, 10, 20),
                       store_rows=(70_000, 210_000), memory_steps=10)


# -- timing -----------------------------------------------------------------------------

def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function, calling them round-robin after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ratio_entry(name: str, ours: float | list[float], baseline: float | list[float], target: float) -> dict:
    """One result row from repeated timings: ratio of medians (met when >= target) and of minima.

    On a shared machine contention only ever adds time, so the ratio of the fastest repeats
    (ratio_of_mins) is the steadier estimate of the intrinsic speed-up."""
    ours_l = ours if isinstance(ours, list) else [ours]
    base_l = baseline if isinstance(baseline, list) else [baseline]
    ours_s, baseline_s = statistics.median(ours_l), statistics.median(base_l)
    ratio = baseline_s / ours_s
    return {"name": name, "ours_s": ours_s, "baseline_s": baseline_s, "ratio": ratio,
            "ratio_of_mins": min(base_l) / min(ours_l), "repeats": len(ours_l),
            "target": target, "met": bool(ratio >= target)}


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# -- 0. precision -----------------------------------------------------------------------

@dataclass
class Precision:
    """The precision this run uses (what `dtype: auto` picks here) and what a bf16 call costs."""

    chosen: str
    """precision.resolve("auto", "cpu"): bfloat16 or float32."""
    budget_s: float
    """See BenchConfig.bf16_budget_s."""
    bf16_s_per_mac: float | None = None
    """Seconds per multiply-add of a bf16 matmul here (set by the matmul benchmark, or probed)."""
    skipped: list[dict] | None = None
    """bf16-only measurements not timed because bf16 is emulated here and they would take too long."""

    @property
    def short(self) -> str:
        return SHORT[self.chosen]

    @property
    def bf16(self) -> bool:
        return self.chosen == "bfloat16"

    @property
    def step_label(self) -> str:
        """How our training step runs: bf16 autocast over fp32 master weights, or plain fp32."""
        return "bf16 autocast" if self.bf16 else "fp32"

    def bf16_affordable(self, name: str, macs: float, shape: tuple[int, int, int]) -> bool:
        """Whether to time a bf16-only measurement of `macs` multiply-adds per call; if not, record it."""
        if self.bf16:
            return True
        if self.bf16_s_per_mac is None:
            self.bf16_s_per_mac = _bf16_rate(shape)
        estimate = macs * self.bf16_s_per_mac
        if estimate <= self.budget_s:
            return True
        self.skipped = (self.skipped or []) + [{
            "name": name, "estimated_s": estimate, "budget_s": self.budget_s,
            "reason": f"bf16 is emulated here (auto picks {self.chosen}): one call estimated at "
                      f"{estimate:.0f} s from the timed bf16 matmul, over the {self.budget_s:g} s budget"}]
        _say(f"not timed: {name} ({self.skipped[-1]['reason']})")
        return False


def _bf16_rate(shape: tuple[int, int, int]) -> float:
    """Seconds per multiply-add of one bf16 [m, k] @ [k, n] matmul (after a warm-up)."""
    a, b = _matmul_operands(shape, torch.bfloat16)
    a @ b
    return _product_time(a, b) / math.prod(shape)


def _product_time(a: torch.Tensor, b: torch.Tensor, min_s: float = 0.02) -> float:
    """Seconds of one a @ b, timing 1, 2, 4, ... products until they take at least `min_s`."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            a @ b
        seconds = time.perf_counter() - t0
        if seconds >= min_s:
            return seconds / n
        n *= 2


def _matmul_operands(shape: tuple[int, int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    return torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)


def matmul_shapes(cfg: BenchConfig) -> list[tuple[str, tuple[int, int, int]]]:
    """(label, (batch, d, H)) of the timed encoder matmuls: the default run's, then the paper's."""
    shapes = [("the default run's encoder", tuple(cfg.run_matmul)),
              ("the paper-sized step's encoder", (cfg.batch_size, cfg.d_a, cfg.dict_size))]
    return [shapes[0]] if shapes[1][1] == shapes[0][1] else shapes


def bench_matmul(cfg: BenchConfig, prec: Precision) -> tuple[list[dict], dict]:
    """bf16 vs fp32 matmul at the training shapes, timed round-robin: the chosen precision against the other.

    ratio = other / chosen, so >= 1 says auto chose the faster precision on this machine; the
    bf16 speed-up itself (fp32 / bf16) is recorded beside it."""
    entries, records = [], []
    for label, shape in matmul_shapes(cfg):
        m, k, n = shape
        name = (f"matmul {m}x{k} @ {k}x{n} ({label}): {prec.short} (chosen) vs "
                f"{SHORT['float32' if prec.bf16 else 'bfloat16']}")
        if prec.bf16_s_per_mac is not None and not prec.bf16_affordable(name, math.prod(shape), shape):
            continue
        a32, b32 = _matmul_operands(shape, torch.float32)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        probe = {}
        for dtype, (a, b) in (("float32", (a32, b32)), ("bfloat16", (a16, b16))):
            a @ b  # warm-up
            probe[dtype] = _product_time(a, b)
        if prec.bf16_s_per_mac is None:
            prec.bf16_s_per_mac = probe["bfloat16"] / math.prod(shape)
        inner = max(1, round(cfg.matmul_call_s / min(probe.values())))

        def calls(a: torch.Tensor, b: torch.Tensor) -> Callable[[], None]:
            def run() -> None:
                for _ in range(inner):
                    a @ b
            return run

        times = time_interleaved({"float32": calls(a32, b32), "bfloat16": calls(a16, b16)},
                                 max(5, cfg.repeats), warmup=0)
        per = {dtype: [t / inner for t in ts] for dtype, ts in times.items()}
        other = "float32" if prec.bf16 else "bfloat16"
        entries.append(ratio_entry(name, per[prec.chosen], per[other], 1.0))
        records.append({"what": label, "shape": list(shape), "products_per_call": inner,
                        "fp32_s": statistics.median(per["float32"]), "bf16_s": statistics.median(per["bfloat16"]),
                        "bf16_speedup": statistics.median(per["float32"]) / statistics.median(per["bfloat16"]),
                        "bf16_speedup_of_mins": min(per["float32"]) / min(per["bfloat16"])})
    return entries, {"matmul": records}


# -- 1. harvest -------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by a forward pre-hook to end a plain transformers forward at a block."""


def random_ids(n_seqs: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Seeded random token ids [S, L] (the work of a forward pass does not depend on the text)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_seqs, seq_len), generator=gen)


def harvest_ours(traced: activations.Traced, ids_SL: torch.Tensor, layer: int) -> torch.Tensor:
    """Our way: the store harvest's nnsight trace (model in harvest's dtype), saving blocks[layer].input, then stop."""
    return activations._forward(traced, ids_SL, [layer])[layer]


def harvest_original(model_fp32, ids_SL: torch.Tensor, layer: int) -> torch.Tensor:
    """The original's way: a full fp32 forward keeping every hidden state (run_with_cache-like)."""
    with torch.no_grad():
        out = model_fp32(ids_SL, output_hidden_states=True)
    return out.hidden_states[layer]


def harvest_limit(model, ids_SL: torch.Tensor, layer: int) -> torch.Tensor:
    """The practical limit: a plain forward of the same model (same precision), stopped by a hook at the block."""
    caught: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        caught["x"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handle = models.block_list(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids_SL)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return caught["x"]


HARVEST_LIMIT_TARGET = {"bfloat16": 0.95, "float32": 0.9}
"""Harvest vs a plain forward stopped at the block, in the precision auto picks: on an AMX CPU
(bf16) the nnsight trace must cost at most 5%; on an AVX2-only CPU (fp32) at most 10%."""


def bench_harvest(cfg: BenchConfig, prec: Precision) -> tuple[list[dict], dict]:
    """Harvest one batch at the layer, model in harvest's dtype auto: ours vs the original's fp32 full
    forward, and vs the limit (a plain forward of the same model, so the same precision)."""
    traced = activations._local_model(cfg.model, "cpu", precision.resolve("auto", "cpu"), remote=False)
    model = traced.nn_model._module
    model_fp32 = model if prec.chosen == "float32" else models.load_model(cfg.model, dtype=torch.float32)[0]
    layer = models.resolve_layer(cfg.layer, models.num_blocks(model))
    ids_SL = random_ids(cfg.harvest_seqs, cfg.seq_len, model.get_input_embeddings().num_embeddings, cfg.seed)
    fns = {"ours": lambda: harvest_ours(traced, ids_SL, layer),
           "original": lambda: harvest_original(model_fp32, ids_SL, layer),
           "limit": lambda: harvest_limit(model, ids_SL, layer)}
    times = time_interleaved(fns, max(cfg.repeats, cfg.harvest_repeats))
    ours_x, limit_x = fns["ours"](), fns["limit"]()
    checks = {"harvest_layer": layer, "harvest_tokens": int(ids_SL.numel()),
              "harvest_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "harvest_ours_equals_limit": bool(torch.equal(ours_x, limit_x))}
    tag = f"{cfg.harvest_seqs}x{cfg.seq_len} tokens, block {layer}"
    return [ratio_entry(f"harvest ({tag}): ours ({prec.short}, dtype auto) vs original (fp32, all hidden states)",
                        times["ours"], times["original"], 3.0),
            ratio_entry(f"harvest ({tag}): ours ({prec.short}) vs limit (plain {prec.short} forward stopped "
                        "at the block)", times["ours"], times["limit"], HARVEST_LIMIT_TARGET[prec.chosen])], checks


# -- 2. training step -------------------------------------------------------------------

LossFn = Callable[[cc_mod.Crosscoder, torch.Tensor, torch.Tensor, float], torch.Tensor]


def loss_ours(model: cc_mod.Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, l1: float) -> torch.Tensor:
    """The library's loss (what train.py optimises)."""
    return model.loss(x_NA, x_NB, l1).total


def fused_l1_loss(model: cc_mod.Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, l1: float) -> torch.Tensor:
    """Same total as Crosscoder.loss, without the [N, H] fp32 copies: addmm, and the decoder-weighted
    L1 as (sum_n f) . norms with an fp32-accumulated sum (no L0 count)."""
    f_NH = torch.relu(torch.addmm(torch.addmm(model.b_enc, x_NA, model.W_enc_A), x_NB, model.W_enc_B))
    xhat_NA = torch.addmm(model.b_dec_A, f_NH, model.W_dec_A)
    xhat_NB = torch.addmm(model.b_dec_B, f_NH, model.W_dec_B)
    mse_a = (xhat_NA.float() - x_NA.float()).pow(2).sum(-1).mean()
    mse_b = (xhat_NB.float() - x_NB.float()).pow(2).sum(-1).mean()
    norms_H = model.W_dec_A.norm(dim=1) + model.W_dec_B.norm(dim=1)
    sparsity = torch.sum(f_NH, 0, dtype=torch.float32) @ norms_H.float() / f_NH.shape[0]
    return mse_a + mse_b + l1 * sparsity


def sparse_decoder_loss(model: cc_mod.Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor,
                        l1: float) -> torch.Tensor:
    """Same total as Crosscoder.loss, decoding only the active latents (embedding_bag over the
    nonzeros of f, fp32): decoder forward and gradients cost nnz x d instead of N x H x d."""
    f_NH = torch.relu(torch.addmm(torch.addmm(model.b_enc, x_NA, model.W_enc_A), x_NB, model.W_enc_B))
    N, H = f_NH.shape
    with torch.no_grad():
        active_NH = f_NH > 0
        flat = active_NH.view(-1).nonzero().squeeze(1)
        offsets_N = torch.zeros(N, dtype=torch.long)
        offsets_N[1:] = active_NH.sum(1).cumsum(0)[:-1]
    latent = flat % H
    vals = f_NH.reshape(-1)[flat].float()
    recon = []
    for W_dec, b_dec, x in ((model.W_dec_A, model.b_dec_A, x_NA), (model.W_dec_B, model.b_dec_B, x_NB)):
        xhat = F.embedding_bag(latent, W_dec.float(), offsets_N, mode="sum", per_sample_weights=vals)
        recon.append((xhat + b_dec - x.float()).pow(2).sum(-1).mean())
    norms_H = model.W_dec_A.norm(dim=1) + model.W_dec_B.norm(dim=1)
    sparsity = torch.sum(f_NH, 0, dtype=torch.float32) @ norms_H.float() / N
    return recon[0] + recon[1] + l1 * sparsity


def make_step(model: cc_mod.Crosscoder, opt: torch.optim.Optimizer, loss_fn: LossFn,
              x_NA: torch.Tensor, x_NB: torch.Tensor, autocast: bool) -> Callable[[], None]:
    """One optimisation step as train.py takes it: loss (bf16 autocast or not), backward, Adam, post_step."""

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total = loss_fn(model, x_NA, x_NB, L1_COEFF)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        model.post_step()

    step.autocast = autocast  # recorded: whether this step ran under bf16 autocast
    return step


def step_macs(cfg: BenchConfig) -> int:
    """Multiply-adds of the step's matmuls: 2 N H (dA + dB) forward, 3 N H (dA + dB) backward."""
    return 5 * cfg.batch_size * cfg.dict_size * (cfg.d_a + cfg.d_b)


def matmul_bound(x_NA: torch.Tensor, x_NB: torch.Tensor, model: cc_mod.Crosscoder,
                 dtype: str = "bfloat16") -> Callable[[], None]:
    """The bare matmuls of one step in `dtype`: 4 forward, and backward dW_enc (2), dW_dec (2), df (2)."""
    dt = getattr(torch, dtype)
    xa, xb = x_NA.to(dt), x_NB.to(dt)
    W_enc_A, W_enc_B = model.W_enc_A.detach().to(dt), model.W_enc_B.detach().to(dt)
    W_dec_A, W_dec_B = model.W_dec_A.detach().to(dt), model.W_dec_B.detach().to(dt)
    f_NH = torch.relu(xa @ W_enc_A + xb @ W_enc_B)
    g_NA, g_NB = torch.randn_like(xa), torch.randn_like(xb)

    def run() -> None:
        xa @ W_enc_A, xb @ W_enc_B, f_NH @ W_dec_A, f_NH @ W_dec_B
        xa.T @ f_NH, xb.T @ f_NH, f_NH.T @ g_NA, f_NH.T @ g_NB, g_NA @ W_dec_A.T, g_NB @ W_dec_B.T

    run.dtype = str(f_NH.dtype).removeprefix("torch.")  # recorded: the bound's actual precision
    return run


def step_data(cfg: BenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random activations scaled like the normalised store rows (mean norm sqrt(d))."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return (torch.randn(cfg.batch_size, cfg.d_a, generator=gen),
            torch.randn(cfg.batch_size, cfg.d_b, generator=gen))


def set_l0(model: cc_mod.Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, l0: int) -> float:
    """Shift b_enc so about `l0` latents per token fire, as in a trained crosscoder; returns the L0."""
    with torch.no_grad():
        pre_NH = x_NA @ model.W_enc_A + x_NB @ model.W_enc_B
        gen = torch.Generator().manual_seed(0)
        sample = pre_NH.view(-1)[torch.randint(0, pre_NH.numel(), (min(pre_NH.numel(), 1 << 20),), generator=gen)]
        model.b_enc.fill_(-float(torch.quantile(sample, 1 - l0 / pre_NH.shape[1])))
        return float((pre_NH + model.b_enc > 0).sum(1).float().mean())


def _adam(model: cc_mod.Crosscoder, fused: bool = False) -> torch.optim.Adam:
    """Adam as train.py builds it (foreach), or the fused kernel."""
    return torch.optim.Adam(model.parameters(), lr=BENCH_LR, **({"fused": True} if fused else {"foreach": True}))


BF16_STEP = "bf16 autocast"
FP32_STEP = "fp32"
BF16_WEIGHTS = "bf16 weights and Adam state (no fp32 master)"


def step_variants(cfg: BenchConfig, x_NA: torch.Tensor, x_NB: torch.Tensor,
                  prec: Precision) -> tuple[dict, dict]:
    """The timed step functions: the fp32 and bf16-autocast steps (ours is the one auto picks), the
    bare matmul bound in the chosen precision, and candidate variants run in the chosen precision.

    Where bf16 is emulated (fp32 chosen) the bf16-only functions are built only if affordable."""
    ccfg = cc_mod.CrosscoderConfig(d_a=cfg.d_a, d_b=cfg.d_b, dict_size=cfg.dict_size)
    model = cc_mod.build(ccfg, seed=cfg.seed)
    adam, fused_adam = _adam(model), _adam(model, fused=True)
    sparse_model = cc_mod.build(ccfg, seed=cfg.seed)
    l0 = set_l0(sparse_model, x_NA, x_NB, cfg.trained_l0)
    sparse_adam = _adam(sparse_model)
    amp = prec.bf16
    tag = f"dA {cfg.d_a}, dB {cfg.d_b}, H {cfg.dict_size}, batch {cfg.batch_size}"
    fns = {FP32_STEP: make_step(model, adam, loss_ours, x_NA, x_NB, autocast=False)}
    if prec.bf16_affordable(f"training step ({tag}): {BF16_STEP}", step_macs(cfg), tuple(cfg.run_matmul)):
        fns[BF16_STEP] = make_step(model, adam, loss_ours, x_NA, x_NB, autocast=True)
    fns |= {
        "bound": matmul_bound(x_NA, x_NB, model, prec.chosen),
        "fused L1": make_step(model, adam, fused_l1_loss, x_NA, x_NB, autocast=amp),
        "fused Adam": make_step(model, fused_adam, loss_ours, x_NA, x_NB, autocast=amp),
        "fused L1 + fused Adam": make_step(model, fused_adam, fused_l1_loss, x_NA, x_NB, autocast=amp),
    }
    if prec.bf16_affordable(f"training step variant: {BF16_WEIGHTS}", step_macs(cfg), tuple(cfg.run_matmul)):
        bf16_model = cc_mod.build(ccfg, seed=cfg.seed).to(torch.bfloat16)
        fns[BF16_WEIGHTS] = make_step(bf16_model, _adam(bf16_model), loss_ours, x_NA.bfloat16(),
                                      x_NB.bfloat16(), autocast=False)
    fns |= {"ours at trained L0": make_step(sparse_model, sparse_adam, loss_ours, x_NA, x_NB, autocast=amp),
            "sparse decoder at trained L0": make_step(sparse_model, sparse_adam, sparse_decoder_loss,
                                                      x_NA, x_NB, autocast=amp)}
    if cfg.compile:
        fns["torch.compile of the loss"] = make_step(model, adam, torch.compile(loss_ours), x_NA, x_NB,
                                                     autocast=amp)
    return fns, {"trained_l0_measured": l0}


def bench_step(cfg: BenchConfig, prec: Precision) -> tuple[list[dict], dict]:
    """One crosscoder training step: bf16 autocast vs fp32 (a property of the machine), ours (the
    precision auto picks) vs the bare matmuls in that precision, and candidate variants vs ours."""
    x_NA, x_NB = step_data(cfg)
    fns, checks = step_variants(cfg, x_NA, x_NB, prec)
    times = time_interleaved(fns, cfg.repeats)
    ours = BF16_STEP if prec.bf16 else FP32_STEP
    tag = f"dA {cfg.d_a}, dB {cfg.d_b}, H {cfg.dict_size}, batch {cfg.batch_size}"
    entries = []
    if BF16_STEP in times:
        entries.append(ratio_entry(f"training step ({tag}): bf16 autocast vs fp32 step (this machine's bf16 "
                                   f"gain; ours is {prec.step_label})", times[BF16_STEP], times[FP32_STEP], 2.0))
    entries.append(ratio_entry(f"training step ({tag}): ours ({prec.step_label}) vs the bare {prec.short} "
                               "matmuls of the same step", times[ours], times["bound"], 0.6))
    reference = {name: ours for name in times if name not in (BF16_STEP, FP32_STEP, "bound", "ours at trained L0")}
    reference["sparse decoder at trained L0"] = "ours at trained L0"
    for name, ref in reference.items():
        entries.append(ratio_entry(f"training step variant ({prec.step_label}): {name} vs {ref}",
                                   times[name], times[ref], 1.0))
    checks["step_compile_timed"] = "torch.compile of the loss" in times
    checks["step_precision"] = prec.step_label
    checks["step_ours_autocast"] = fns[ours].autocast
    checks["step_bound_dtype"] = fns["bound"].dtype
    return entries, checks


# -- 3. end to end ----------------------------------------------------------------------

def original_harvest(spec: str, ids_SL: torch.Tensor, layer: int, batch_size: int) -> torch.Tensor:
    """The original's harvest: fp32 model, full forwards keeping every hidden state, rows kept in RAM."""
    model, _ = models.load_model(spec, dtype=torch.float32)
    rows = [harvest_original(model, ids_SL[i: i + batch_size], layer)[:, 1:].reshape(-1, models.hidden_size(model))
            for i in range(0, ids_SL.shape[0], batch_size)]
    x_ND = torch.cat(rows)
    return x_ND * (math.sqrt(x_ND.shape[1]) / x_ND.norm(dim=1).mean())


def original_train(x_ND: torch.Tensor, dict_size: int, steps: int, batch_size: int, seed: int) -> float:
    """The original's training: fp32 crosscoder (same loss), Adam, random batches from RAM; last loss."""
    model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=x_ND.shape[1], d_b=x_ND.shape[1], dict_size=dict_size), seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = x_ND[torch.randint(0, x_ND.shape[0], (batch_size,), generator=gen)]
        total = model.loss(x, x, L1_COEFF).total
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return total.item()


def ours_train(store: activations.ActivationStore, layer: int, dict_size: int, steps: int, batch_size: int,
               seed: int, out_dir: Path) -> list[dict]:
    """Our training: train.train on the memmapped store paired with itself (dtype auto)."""
    data = activations.PairedActivations(store, store, layer, layer)
    model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=data.d_a, d_b=data.d_b, dict_size=dict_size), seed)
    return train_mod.train(model, data, TrainConfig(tokens=steps * batch_size, batch_size=batch_size, seed=seed,
                                                    dtype="auto"), L1_COEFF, out_dir, desc="bench train")


def bench_end_to_end(cfg: BenchConfig, prec: Precision, work: Path) -> tuple[list[dict], dict]:
    """One pair (the model with itself), one layer: harvest + training, ours vs the original's way."""
    n_blocks, _ = models.model_shape(cfg.model)
    layer = models.resolve_layer(cfg.layer, n_blocks)
    models.load_model(cfg.model, dtype=torch.float32)  # warm the page cache for both sides alike
    vocab = models.read_config(cfg.model).get_text_config().vocab_size
    ids_SL = random_ids(max(2, math.ceil(cfg.e2e_tokens / (cfg.seq_len - 1))), cfg.seq_len, vocab, cfg.seed + 1)
    t_ours_h, store = timed(lambda: activations.harvest(cfg.model, ids_SL, [layer], batch_size=cfg.harvest_seqs,
                                                        dtype="auto", root=work / "stores", desc="bench"))
    t_orig_h, x_ND = timed(lambda: original_harvest(cfg.model, ids_SL, layer, cfg.harvest_seqs))
    t_ours_t, _ = timed(lambda: ours_train(store, layer, cfg.e2e_dict, cfg.e2e_steps, cfg.e2e_batch,
                                           cfg.seed, work / "ours_crosscoder"))
    t_orig_t, _ = timed(lambda: original_train(x_ND, cfg.e2e_dict, cfg.e2e_steps, cfg.e2e_batch, cfg.seed))
    tag = f"{store.n_tokens} tokens, {cfg.e2e_steps} steps x {cfg.e2e_batch}, H {cfg.e2e_dict}"
    entries = [ratio_entry(f"end to end ({tag}): ours ({prec.short}) vs original (fp32)",
                           t_ours_h + t_ours_t, t_orig_h + t_orig_t, 3.0),
               ratio_entry("end to end: harvest part", t_ours_h, t_orig_h, 3.0),
               ratio_entry("end to end: training part", t_ours_t, t_orig_t, 2.0)]
    return entries, {"e2e_tokens": store.n_tokens, "e2e_layer": layer}


# -- 4. growth --------------------------------------------------------------------------

def make_store(directory: Path, n_rows: int, d_model: int, seq_len: int, seed: int,
               chunk: int = 65_536) -> activations.ActivationStore:
    """A valid store (manifest + memmap + index) of seeded random bf16 rows, about n_rows of them."""
    n_seqs = max(2, math.ceil(n_rows / (seq_len - 1)))
    positions = activations.all_but_first(n_seqs, seq_len)
    n_tokens = n_seqs * (seq_len - 1)
    directory.mkdir(parents=True, exist_ok=True)
    rows_u16 = np.memmap(activations._partial(directory, STORE_LAYER), dtype=np.uint16, mode="w+",
                         shape=(n_tokens, d_model))
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n_tokens, chunk):
        x = torch.randn(min(chunk, n_tokens - start), d_model, generator=gen).mul_(RAW_SCALE)
        rows_u16[start: start + len(x)] = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    rows_u16.flush()
    del rows_u16
    seq_ptr = torch.arange(n_seqs + 1, dtype=torch.long) * (seq_len - 1)
    io.save_tensors(directory / activations.INDEX, {"seq_ptr": seq_ptr, "pos": torch.cat(positions).long()})
    activations._finish_store(directory, "synthetic", [STORE_LAYER], d_model, positions)
    return activations.ActivationStore.open(directory)


class PeakMemory:
    """Samples this process's RSS and its anonymous part (RSS minus file-backed pages) in a thread."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        proc = psutil.Process()
        while True:
            info = proc.memory_info()
            self.peak_rss = max(self.peak_rss, info.rss)
            self.peak_anon = max(self.peak_anon, info.rss - getattr(info, "shared", 0))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_child(store_dir: str, dict_size: int, steps: int, batch_size: int, seed: int, out_dir: str) -> dict:
    """Run in a fresh process: open the store, train, report peak RSS and peak anonymous memory (MiB)."""
    with PeakMemory() as peak:
        store = activations.ActivationStore.open(store_dir)
        ours_train(store, STORE_LAYER, dict_size, steps, batch_size, seed, Path(out_dir))
    return {"store_rows": store.n_tokens, "store_mib": store.n_tokens * store.d_model * 2 / 2**20,
            "peak_rss_mib": max(_high_water_rss(), peak.peak_rss) / 2**20, "peak_anon_mib": peak.peak_anon / 2**20}


def _high_water_rss() -> int:
    """This process's peak RSS in bytes from /proc (VmHWM), 0 where there is no /proc.

    Not getrusage: on Linux a child's ru_maxrss starts from its parent's RSS at fork time."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    line = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else 0


def peak_memory(store: activations.ActivationStore, cfg: BenchConfig, out_dir: Path) -> dict:
    """Peak memory of a training run on `store`, measured in a child Python process of its own."""
    args = [str(store.directory), cfg.e2e_dict, cfg.memory_steps, cfg.e2e_batch, cfg.seed, str(out_dir)]
    code = ("import json, sys; from benchmarks.run import memory_child; "
            "print(json.dumps(memory_child(*json.loads(sys.argv[1]))))")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=root, env=env,
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_growth(cfg: BenchConfig, work: Path) -> tuple[list[dict], dict]:
    """Seconds per step over growing budgets (should be flat) and peak memory over store sizes (flat)."""
    stores = [make_store(work / f"store_{rows}", rows, cfg.d_a, cfg.seq_len, cfg.seed + i)
              for i, rows in enumerate(cfg.store_rows)]
    per_step = []
    for steps in cfg.growth_steps:
        seconds, _ = timed(lambda: ours_train(stores[0], STORE_LAYER, cfg.e2e_dict, steps, cfg.e2e_batch,
                                              cfg.seed, work / f"growth_{steps}"))
        per_step.append({"steps": steps, "seconds": seconds, "s_per_step": seconds / steps})
    first, last = per_step[0], per_step[-1]
    entries = [ratio_entry(f"training growth: s/step at {last['steps']} vs {first['steps']} steps "
                           "(1 = linear)", last["s_per_step"], first["s_per_step"], 0.85)]
    memory = [peak_memory(store, cfg, work / f"memory_{store.n_tokens}") for store in stores]
    anon_ratio = memory[0]["peak_anon_mib"] / memory[1]["peak_anon_mib"]
    growth = {"per_step": per_step, "memory": memory,
              "memory_check": {"name": "peak anonymous memory, small / large store (1 = flat)",
                               "ratio": anon_ratio, "target": 0.9, "met": bool(anon_ratio >= 0.9)}}
    return entries, growth


# -- report -----------------------------------------------------------------------------

def machine_info() -> dict:
    """What the numbers were measured on, including the precision auto picks here and why (the
    machine may be shared: see load_average, at the start and, later, at the end)."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_features": precision.cpu_features(), "precision": precision.summary("cpu"),
            "emulation": {k: os.environ[k] for k in EMULATE_AVX2 if k in os.environ},
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average": _load_average()}


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def machine_line(results: dict) -> str:
    """One line: CPU, torch, threads, what auto picks and why, the bf16 speed-up, load averages."""
    m, p = results["machine"], results["machine"]["precision"]
    speedup = f"{p['bf16_speedup']:.3g}x" if p.get("bf16_speedup") is not None else "not measured"
    records = results.get("precision", {}).get("matmul", [])
    measured = "; ".join(f"{r['what']} {r['bf16_speedup']:.3g}x" + (
        f" (bf16 {1 / r['bf16_speedup']:.0f}x slower)" if r["bf16_speedup"] < 1 else "") for r in records)
    emulation = (" Emulated AVX2-only CPU: " + " ".join(f"{k}={v}" for k, v in m["emulation"].items()) + "."
                 if m.get("emulation") else "")
    return (f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
            f"capability {p['capability']}, bf16 native: {'yes' if p['bf16_native'] else 'no'}; "
            f"precision auto -> {p['dtype']} ({p['reason']}); bf16 matmul speed-up (fp32 / bf16) by precision.py: "
            f"{speedup}" + (f", here: {measured}" if measured else "") + f". Load average at start "
            f"{m['load_average']}, at end {m.get('load_average_end')} (shared machine: the ratios are what count)."
            + emulation)


def to_markdown(results: dict) -> str:
    """The machine line, then the results as Markdown tables (ratios, seconds per step, peak memory)."""
    lines = [machine_line(results), "",
             "| benchmark | ours (s) | baseline (s) | ratio | ratio of fastest | target | met |",
             "|---|---:|---:|---:|---:|---:|:-:|"]
    for e in results["ratios"]:
        lines.append(f"| {e['name']} | {e['ours_s']:.4g} | {e['baseline_s']:.4g} | {e['ratio']:.2f}x "
                     f"| {e['ratio_of_mins']:.2f}x | {e['target']:g}x | {'yes' if e['met'] else 'no'} |")
    for s in results.get("skipped", []):
        lines.append(f"| {s['name']} | not timed | | | | | |")
    if results.get("skipped"):
        lines += ["", "Not timed: " + "; ".join(f"{s['name']}: {s['reason']}" for s in results["skipped"]) + "."]
    growth = results.get("growth")
    if growth:
        lines += ["", "| training steps | seconds | s / step |", "|---:|---:|---:|"]
        lines += [f"| {r['steps']} | {r['seconds']:.2f} | {r['s_per_step']:.4f} |" for r in growth["per_step"]]
        lines += ["", "| store rows | store (MiB) | peak RSS (MiB) | peak anonymous (MiB) |", "|---:|---:|---:|---:|"]
        lines += [f"| {m['store_rows']} | {m['store_mib']:.0f} | {m['peak_rss_mib']:.0f} | {m['peak_anon_mib']:.0f} |"
                  for m in growth["memory"]]
        check = growth["memory_check"]
        lines += ["", f"{check['name']}: {check['ratio']:.2f} (target >= {check['target']:g}, "
                  f"{'met' if check['met'] else 'not met'}). Peak RSS also counts the memmapped store pages the "
                  "OS may drop at will; the anonymous part is what training itself holds."]
    return "\n".join(lines) + "\n"


def run(cfg: BenchConfig, out_dir: Path, stem: str = RESULTS_STEM, parts: tuple[str, ...] = PARTS) -> dict:
    """Run the benchmarks in `parts`; write out_dir/STEM.json and STEM.md; return the results."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"bench parts {unknown}: accepted: {', '.join(PARTS)}")
    prec = Precision(precision.resolve("auto", "cpu"), float(cfg.bf16_budget_s))
    results: dict = {"machine": machine_info(), "config": asdict(cfg), "ratios": [], "checks": {}}
    _say(precision.detect("cpu").line())
    with tempfile.TemporaryDirectory(prefix="hs-bench-") as tmp:
        work = Path(tmp)
        benches = {"matmul": lambda: bench_matmul(cfg, prec), "harvest": lambda: bench_harvest(cfg, prec),
                   "training step": lambda: bench_step(cfg, prec),
                   "end to end": lambda: bench_end_to_end(cfg, prec, work),
                   "growth": lambda: bench_growth(cfg, work)}
        for label in (p for p in PARTS if p in parts):
            _say(f"{label} ...")
            seconds, (entries, extra) = timed(benches[label])
            results["ratios"] += entries
            if label == "growth":
                results["growth"] = extra
            elif label == "matmul":
                results["precision"] = extra
            else:
                results["checks"].update(extra)
            _say(f"{label} done in {seconds:.0f} s")
    results["skipped"] = prec.skipped or []
    results["machine"]["load_average_end"] = _load_average()
    io.write_json(out_dir / f"{stem}.json", results, digits=4)
    io.write_text(out_dir / f"{stem}.md", to_markdown(results))
    return results


def main(argv: list[str] | None = None) -> dict:
    """Command line: parse, run (under the AVX2 emulation in a child process if asked), print the table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrink every size (about 1-2 minutes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder for the results (default: benchmarks/)")
    parser.add_argument("--name", default=None,
                        help=f"file stem of the results: STEM.json, STEM.md (default: results, "
                             f"or {EMULATED_STEM} with --emulate-avx2)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma-separated benchmarks to run (default: all of %(default)s)")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run with torch, oneDNN and MKL held to AVX2 (" +
                             " ".join(f"{k}={v}" for k, v in EMULATE_AVX2.items()) + ")")
    parser.add_argument("--model", default=BenchConfig.model, help="model spec (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement (default 3; more steadies a busy machine)")
    args = parser.parse_args(argv)
    stem = args.name or (EMULATED_STEM if args.emulate_avx2 else RESULTS_STEM)
    if args.emulate_avx2 and any(os.environ.get(k) != v for k, v in EMULATE_AVX2.items()):
        # The kernel levels are fixed when torch and oneDNN load: rerun in a fresh process.
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ, **EMULATE_AVX2)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "benchmarks.run", *argv, "--name", stem, "--out", str(args.out.resolve())]
        subprocess.run(cmd, cwd=root, env=env, check=True)
        return io.read_json(args.out / f"{stem}.json")
    parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
    cfg = BenchConfig(model=args.model)
    cfg = cfg.quick() if args.quick else cfg
    results = run(replace(cfg, repeats=args.repeats) if args.repeats else cfg, args.out, stem, parts)
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
