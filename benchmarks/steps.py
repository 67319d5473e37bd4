"""Training-step benchmarks: the crosscoder step (dense and sparse), thread scaling, student training.

"Ours" is the step train.py takes (train.LossModule with the params defaults: the fused step,
sparse below train.sparse_below, in the precision auto picks), against the bare matmuls of the
same step, against autograd through Crosscoder.loss, and against candidate variants.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.config import BENCH_LR, L1_COEFF, BenchConfig
from benchmarks.timing import Precision, ratio_entry, say, time_interleaved
from hidden_signatures.crosscoders import crosscoder as cc_mod
from hidden_signatures.crosscoders import sparse_probe
from hidden_signatures.models import distill, finetune, lm_training
from hidden_signatures.models import loading as models
from hidden_signatures.run import derived, params
from hidden_signatures.crosscoders import train as train_mod
from hidden_signatures.crosscoders.train_config import TrainConfig

LossFn = Callable[[cc_mod.Crosscoder, torch.Tensor, torch.Tensor, float], torch.Tensor]
BF16_STEP, FP32_STEP = "bf16", "fp32"
BF16_WEIGHTS = "bf16 weights and Adam state (no fp32 master)"
REPO = Path(__file__).resolve().parents[1]
AUTOGRAD = "autograd through Crosscoder.loss"
BATCHTOPK_K = 32
"""k of the BatchTopK rows (the crosscoder.k default)."""


# -- the steps -------------------------------------------------------------------------------


def library_step(model: cc_mod.Crosscoder, opt: torch.optim.Optimizer, x_NA: torch.Tensor, x_NB: torch.Tensor,
                 **train: object) -> Callable[[], None]:
    """One step exactly as train.py takes it (LossModule over TrainConfig(**train)), then Adam."""
    batch = x_NA.shape[0]  # sparse_below: auto is probed at the step's real batch
    loss = train_mod.LossModule(model, TrainConfig(tokens=batch, batch_size=batch, **train), torch.device("cpu"))

    def step() -> None:
        parts = loss(x_NA, x_NB, L1_COEFF)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()

    step.autocast = loss.bf16 and not loss.fused  # recorded: whether this step ran under bf16 autocast
    step.sparse_below = loss.sparse_below  # recorded: the threshold this step used (auto resolved)
    return step


def loss_ours(model: cc_mod.Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, l1: float) -> torch.Tensor:
    """Crosscoder.loss through autograd (train.step: autograd)."""
    return model.loss(x_NA, x_NB, l1).total


def fused_l1_loss(model: cc_mod.Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, l1: float) -> torch.Tensor:
    """Same total as Crosscoder.loss through autograd, with addmm and an fp32-accumulated L1 (no L0 count)."""
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
    """Same total through autograd, decoding only the active latents (embedding_bag, fp32): the
    approach of sparse-autoencoder trainers' sparse decoders, with autograd's backward."""
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
    """One autograd step: loss (bf16 autocast or not), backward, Adam."""

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total = loss_fn(model, x_NA, x_NB, L1_COEFF)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    step.autocast = autocast
    return step


def step_macs(batch: int, d_a: int, d_b: int, dict_size: int) -> int:
    """Multiply-adds of the dense step's matmuls: 2 N H (dA + dB) forward, 3 N H (dA + dB) backward."""
    return 5 * batch * dict_size * (d_a + d_b)


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


def step_data(batch: int, d_a: int, d_b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random activations scaled like the normalised store rows (mean norm sqrt(d))."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d_a, generator=gen), torch.randn(batch, d_b, generator=gen)


def set_l0(model: cc_mod.Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, l0: int) -> float:
    """Shift b_enc so about `l0` latents per token fire, as in a trained crosscoder; returns the L0."""
    with torch.no_grad():
        pre_NH = x_NA @ model.W_enc_A + x_NB @ model.W_enc_B
        gen = torch.Generator().manual_seed(0)
        sample = pre_NH.view(-1)[torch.randint(0, pre_NH.numel(), (min(pre_NH.numel(), 1 << 20),), generator=gen)]
        model.b_enc.fill_(-float(torch.quantile(sample, 1 - l0 / pre_NH.shape[1])))
        return float((pre_NH + model.b_enc > 0).sum(1).float().mean())


def _adam(model: torch.nn.Module, fused: bool = True) -> torch.optim.Adam:
    """Adam as train.py builds it on CPU (the fused kernel), or the foreach one."""
    return torch.optim.Adam(model.parameters(), lr=BENCH_LR, **({"fused": True} if fused else {"foreach": True}))


def adam_update(ccfg: cc_mod.CrosscoderConfig, seed: int) -> Callable[[], None]:
    """The fused Adam update alone, over a crosscoder's fp32 parameters with gradients in place: the part
    of a step that the bare matmuls leave out and that no sparsity shrinks (every weight moves)."""
    model = cc_mod.build(ccfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=gen) * 1e-3
    opt = _adam(model)

    def step() -> None:
        opt.step()

    step.n_params = sum(p.numel() for p in model.parameters())
    return step


# -- 2a. the dense step at the paper's shape -------------------------------------------------------


FP32_BOUND = "bound, fp32"
"""The step's bare matmuls in fp32 where bf16 is chosen: with the bf16 bound, the ceiling of the step's bf16 gain."""


def step_variants(cfg: BenchConfig, x_NA: torch.Tensor, x_NB: torch.Tensor,
                  prec: Precision) -> tuple[dict, dict]:
    """Ours in both precisions, the bare matmul bound in the chosen one (and in fp32 where bf16 is
    chosen), autograd and its variants, and ours at a trained L0 (sparse) against the dense fused
    step there.

    Where bf16 is emulated (fp32 chosen) the bf16-only functions are built only if affordable."""
    ccfg = cc_mod.CrosscoderConfig(d_a=cfg.d_a, d_b=cfg.d_b, dict_size=cfg.dict_size)
    model = cc_mod.build(ccfg, seed=cfg.seed)
    adam, foreach_adam = _adam(model), _adam(model, fused=False)
    amp = prec.bf16
    tag = f"dA {cfg.d_a}, dB {cfg.d_b}, H {cfg.dict_size}, batch {cfg.batch_size}"
    macs = step_macs(cfg.batch_size, cfg.d_a, cfg.d_b, cfg.dict_size)
    fns = {FP32_STEP: library_step(model, adam, x_NA, x_NB, dtype="float32")}
    if prec.bf16_affordable(f"training step ({tag}): ours in bf16", macs, tuple(cfg.run_matmul)):
        fns[BF16_STEP] = library_step(model, adam, x_NA, x_NB, dtype="bfloat16")
    fns |= {
        "bound": matmul_bound(x_NA, x_NB, model, prec.chosen),
        **({FP32_BOUND: matmul_bound(x_NA, x_NB, model, "float32")} if prec.bf16 else {}),
        AUTOGRAD: make_step(model, adam, loss_ours, x_NA, x_NB, autocast=amp),
        "autograd, fused L1": make_step(model, adam, fused_l1_loss, x_NA, x_NB, autocast=amp),
        "foreach Adam": library_step(model, foreach_adam, x_NA, x_NB, dtype=prec.chosen),
    }
    if prec.bf16_affordable(f"training step variant: {BF16_WEIGHTS}", macs, tuple(cfg.run_matmul)):
        bf16_model = cc_mod.build(ccfg, seed=cfg.seed).to(torch.bfloat16)
        fns[BF16_WEIGHTS] = make_step(bf16_model, _adam(bf16_model), loss_ours, x_NA.bfloat16(),
                                      x_NB.bfloat16(), autocast=False)
    if cfg.compile:
        fns["autograd, torch.compile of the loss"] = make_step(model, adam, torch.compile(loss_ours), x_NA, x_NB,
                                                               autocast=amp)
    sparse_model = cc_mod.build(ccfg, seed=cfg.seed)
    l0 = set_l0(sparse_model, x_NA, x_NB, cfg.trained_l0)
    sparse_adam = _adam(sparse_model)
    fns |= {"ours at trained L0": library_step(sparse_model, sparse_adam, x_NA, x_NB, dtype=prec.chosen),
            "dense at trained L0": library_step(sparse_model, sparse_adam, x_NA, x_NB, dtype=prec.chosen,
                                                sparse_below=0.0),
            "autograd, sparse decoder at trained L0": make_step(sparse_model, sparse_adam, sparse_decoder_loss,
                                                                x_NA, x_NB, autocast=amp)}
    return fns, {"trained_l0_measured": l0, "trained_density": l0 / cfg.dict_size}


def bench_step(cfg: BenchConfig, prec: Precision) -> tuple[list[dict], dict]:
    """One crosscoder training step at the paper's shape: bf16 vs fp32, ours vs the bare matmuls in
    the chosen precision, variants vs ours, and the sparse step vs the dense one at a trained L0."""
    x_NA, x_NB = step_data(cfg.batch_size, cfg.d_a, cfg.d_b, cfg.seed)
    fns, checks = step_variants(cfg, x_NA, x_NB, prec)
    times = time_interleaved(fns, cfg.repeats)
    ours = BF16_STEP if prec.bf16 else FP32_STEP
    tag = f"dA {cfg.d_a}, dB {cfg.d_b}, H {cfg.dict_size}, batch {cfg.batch_size}"
    entries = []
    if BF16_STEP in times:
        entries.append(ratio_entry(f"training step ({tag}): bf16 vs fp32 (this machine's bf16 gain; ours is "
                                   f"{prec.short})", times[BF16_STEP], times[FP32_STEP], 2.0))
    entries.append(ratio_entry(f"training step ({tag}): ours ({prec.short}) vs the bare {prec.short} "
                               "matmuls of the same step", times[ours], times["bound"], 0.6))
    if FP32_BOUND in times:  # the step's bf16 gain cannot pass its matmuls' own
        entries.append(ratio_entry(f"bare matmuls of the training step ({tag}): bf16 vs fp32 (what bounds the "
                                   "step's bf16 gain)", times["bound"], times[FP32_BOUND], 2.0))
    density = checks["trained_density"]
    below = fns["ours at trained L0"].sparse_below  # what the trainer's auto resolved to at this shape
    entries.append(ratio_entry(f"training step at trained L0 {checks['trained_l0_measured']:.0f} of "
                               f"{cfg.dict_size} ({tag}): ours (sparse below {below:g}, auto) vs "
                               "the dense fused step", times["ours at trained L0"], times["dense at trained L0"],
                               2.0))
    entries.append(ratio_entry("training step at trained L0: ours vs autograd with a sparse decoder",
                               times["ours at trained L0"], times["autograd, sparse decoder at trained L0"], 1.0))
    for name in [n for n in times if n.startswith("autograd") and "trained L0" not in n] + ["foreach Adam",
                                                                                             BF16_WEIGHTS]:
        if name in times:
            entries.append(ratio_entry(f"training step variant: {name} vs ours ({prec.short})",
                                       times[name], times[ours], 1.0))
    checks.update(step_compile_timed=cfg.compile, step_precision=prec.short,
                  step_ours_autocast=fns[ours].autocast, step_bound_dtype=fns["bound"].dtype,
                  trained_step_sparse=density < below, sparse_below_auto=below)
    return entries, checks


def sparse_below_here(d_a: int, d_b: int, dict_size: int, batch: int, prec: Precision) -> float:
    """What the trainer's `sparse_below: auto` resolves to at this shape and precision (probed once, cached)."""
    return sparse_probe.resolve(TrainConfig.sparse_below, d_a, d_b, dict_size, batch, getattr(torch, prec.chosen))


# -- 2b. the default run's shape: dense vs bound, and where sparse stops paying ----------------------


def bench_sparsity(cfg: BenchConfig, prec: Precision) -> tuple[list[dict], dict]:
    """At the default run's shape (run_matmul: batch, d, H; both sides d wide): ours dense vs the bare
    matmuls, and the sparse vs the dense step at each of threshold_l0s; the crossover density."""
    batch, d, H = cfg.run_matmul
    x_NA, x_NB = step_data(batch, d, d, cfg.seed)
    ccfg = cc_mod.CrosscoderConfig(d_a=d, d_b=d, dict_size=H)
    dense_model = cc_mod.build(ccfg, seed=cfg.seed)
    fns = {"dense": library_step(dense_model, _adam(dense_model), x_NA, x_NB, dtype=prec.chosen),
           "bound": matmul_bound(x_NA, x_NB, dense_model, prec.chosen)}
    fns["adam"] = adam_update(ccfg, cfg.seed)
    fns["bound + adam"] = lambda: (fns["bound"](), fns["adam"]())
    densities = {}
    for l0 in cfg.threshold_l0s:
        model = cc_mod.build(ccfg, seed=cfg.seed)
        densities[l0] = set_l0(model, x_NA, x_NB, l0) / H
        opt = _adam(model)
        fns[f"sparse {l0}"] = library_step(model, opt, x_NA, x_NB, dtype=prec.chosen, sparse_below=1.0)
        fns[f"dense {l0}"] = library_step(model, opt, x_NA, x_NB, dtype=prec.chosen, sparse_below=0.0)
    for name, below in (("batchtopk sparse", 1.0), ("batchtopk dense", 0.0)):
        model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=d, d_b=d, dict_size=H, architecture="batchtopk",
                                                     k=BATCHTOPK_K), seed=cfg.seed).train()
        model.sparse_below = below
        fns[name] = library_step(model, _adam(model), x_NA, x_NB, dtype=prec.chosen)
    times = time_interleaved(fns, max(cfg.repeats, 5))
    tag = f"dA {d}, dB {d}, H {H}, batch {batch}"
    entries = [ratio_entry(f"training step ({tag}, the default run's shape): ours dense ({prec.short}) vs the "
                           f"bare {prec.short} matmuls of the same step", times["dense"], times["bound"], 0.6),
               ratio_entry(f"training step ({tag}): ours dense ({prec.short}) vs the bare matmuls plus the fused "
                           f"Adam update of the same parameters (fp32, as train.py keeps them)", times["dense"],
                           times["bound + adam"], 0.6)]
    ratios = {}
    for l0, density in densities.items():
        entry = ratio_entry(f"training step ({tag}) at L0 {l0} (density {density:.3f}): sparse vs dense",
                            times[f"sparse {l0}"], times[f"dense {l0}"], 1.0)
        entries.append(entry)
        ratios[density] = entry["ratio"]
    entries.append(ratio_entry(f"BatchTopK training step ({tag}, k {BATCHTOPK_K}): decoding the kept entries "
                               "(decode_active) vs decode(f)", times["batchtopk sparse"], times["batchtopk dense"],
                               1.0))
    median = {name: statistics.median(times[name]) for name in ("dense", "bound", "adam")}
    return entries, {"run_shape_dense_s": median["dense"], "run_shape_bound_s": median["bound"],
                     "run_shape_adam_s": median["adam"], "run_shape_params": fns["adam"].n_params,
                     "sparse_crossover_density": crossover(ratios), "sparse_ratio_by_density": ratios,
                     "sparse_below_auto_run_shape": sparse_below_here(d, d, H, batch, prec)}


def crossover(ratio_by_density: dict[float, float]) -> float | None:
    """The density where sparse/dense speed-up falls through 1 (log-linear between the measured points);
    None if it never does in the measured range (the largest density is then a lower bound)."""
    points = sorted(ratio_by_density.items())
    for (d0, r0), (d1, r1) in zip(points, points[1:]):
        if r0 >= 1 > r1:
            t = (math.log(r0)) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    return None if points[-1][1] >= 1 else points[0][0]


# -- 2c. threads ------------------------------------------------------------------------------------


def bench_threads(cfg: BenchConfig, prec: Precision) -> tuple[list[dict], dict]:
    """Ours at the default run's shape on 1 thread vs all of torch's threads (how close to N x)."""
    batch, d, H = cfg.run_matmul
    x_NA, x_NB = step_data(batch, d, d, cfg.seed)
    model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=d, d_b=d, dict_size=H), seed=cfg.seed)
    step = library_step(model, _adam(model), x_NA, x_NB, dtype=prec.chosen)
    n = torch.get_num_threads()

    def on(threads: int) -> Callable[[], None]:
        def run() -> None:
            torch.set_num_threads(threads)
            try:
                step()
            finally:
                torch.set_num_threads(n)
        return run

    times = time_interleaved({"1": on(1), "all": on(n)}, max(cfg.repeats, 5))
    entry = ratio_entry(f"training step (dA {d}, dB {d}, H {H}, batch {batch}): {n} threads vs 1 "
                        f"(ideal {n}x)", times["all"], times["1"], 0.8 * n)
    return [entry], {"threads": n}


# -- 2d. students ----------------------------------------------------------------------------------


def run_distill_config(cfg: BenchConfig, dtype: str) -> distill.DistillConfig:
    """The default run's distillation settings on this machine (params/<cfg.distill_params>.yaml, its
    fp32_cpu section applied where it applies: the objectives' weights, the Jacobian term's directions
    and sequences, the student's start) as one step in `dtype`; DistillConfig's defaults if it is ""."""
    if not cfg.distill_params:
        return distill.DistillConfig(steps=1, warmup_steps=0, autocast_dtype=dtype)
    run = params.load(params.find_params(cfg.distill_params, REPO / "params"))
    return dataclasses.replace(derived.train_config(run, "distill-kl"), steps=1, warmup_steps=0,
                               autocast_dtype=dtype)


def student_setup(cfg: BenchConfig, dtype: str):
    """(teacher, the default run's student of it, that run's one-step DistillConfig in `dtype`, a seeded
    random batch of cfg.distill_seqs x cfg.distill_len)."""
    lm_cfg = run_distill_config(cfg, dtype)
    teacher, _tok = models.load_model(cfg.model, dtype=torch.float32)
    student, _ = distill.make_student(teacher, lm_cfg.student_blocks)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch_BT = torch.randint(0, teacher.config.vocab_size, (cfg.distill_seqs, cfg.distill_len), generator=gen)
    return teacher, student, lm_cfg, batch_BT


def bench_distill(cfg: BenchConfig, prec: Precision) -> tuple[list[dict], dict]:
    """One distillation step (KL, and KL + Jacobian as the default run trains it) against a plain
    forward + backward of the student (LM loss) on the same batch, all in the chosen precision and
    through the shared LM step."""
    teacher, student, lm_cfg, batch_BT = student_setup(cfg, prec.chosen)
    eager_teacher, eager_student = copy.deepcopy(teacher), copy.deepcopy(student)
    for model in (eager_teacher, eager_student):
        distill.ensure_eager(model)  # as distill.distill does for kl_jacobian: forward-mode AD needs eager
    opt, eager_opt = lm_training.make_optimizer(student, lm_cfg), lm_training.make_optimizer(eager_student, lm_cfg)

    def step(model, fn, optimizer) -> Callable[[], None]:
        return lambda: lm_training._train_step(model, fn, batch_BT, 0, optimizer, lm_cfg)

    fns = {"plain": step(student, finetune.lm_step, opt),  # the fine-tune's step: LM loss only
           "kl": step(student, distill.make_step_fn(teacher, lm_cfg, "kl"), opt),
           "kl_jacobian": step(eager_student, distill.make_step_fn(eager_teacher, lm_cfg, "kl_jacobian"), eager_opt)}
    times = time_interleaved(fns, cfg.repeats)
    tag = f"{cfg.distill_seqs} x {cfg.distill_len} tokens, {prec.short}"
    jac = min(lm_cfg.jac_max_seqs or cfg.distill_seqs, cfg.distill_seqs)
    entries = [ratio_entry(f"student step ({tag}): KL distillation vs a plain forward + backward of the student",
                           times["kl"], times["plain"], 0.5),
               ratio_entry(f"student step ({tag}): KL + Jacobian as the default run trains it (Jacobian term on "
                           f"{jac} of {cfg.distill_seqs} sequences, {lm_cfg.n_dirs} direction(s)) vs a plain "
                           f"forward + backward of the student", times["kl_jacobian"], times["plain"], 0.2)]
    say(f"student step: plain {min(times['plain']):.2f} s, kl {min(times['kl']):.2f} s, "
        f"kl_jacobian {min(times['kl_jacobian']):.2f} s")
    return entries, {"student_layers": student.config.num_hidden_layers, "distill_params": cfg.distill_params,
                     "student_blocks": lm_cfg.student_blocks, "jacobian_n_dirs": lm_cfg.n_dirs,
                     "jacobian_seqs": jac}
