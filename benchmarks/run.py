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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch

from benchmarks.config import L1_COEFF, RAW_SCALE, SHORT, STORE_LAYER, BenchConfig
from benchmarks.steps import bench_distill, bench_sparsity, bench_step, bench_threads
from benchmarks.timing import (Precision, matmul_operands, product_time, ratio_entry, say, time_interleaved,
                               timed)
from hidden_signatures import io, precision
from hidden_signatures.harvest import activations
from hidden_signatures.models import loading as models
from hidden_signatures.crosscoders import crosscoder as cc_mod
from hidden_signatures.crosscoders import train as train_mod
from hidden_signatures.crosscoders.train_config import TrainConfig

RESULTS_STEM = "results"
RESULTS_JSON = f"{RESULTS_STEM}.json"
RESULTS_MD = f"{RESULTS_STEM}.md"
PARTS = ("matmul", "harvest", "training step", "sparse step", "threads", "students", "end to end", "growth")
EMULATE_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""Environment that holds torch's kernels, oneDNN and MKL to AVX2: an approximation of an AVX2-only
CPU on an AMX one (harsher on bf16, which it emulates about 40x slower than fp32, than a real one's 4x)."""
EMULATED_STEM = "results-avx2-emulated"


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
        a32, b32 = matmul_operands(shape, torch.float32)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        probe = {}
        for dtype, (a, b) in (("float32", (a32, b32)), ("bfloat16", (a16, b16))):
            a @ b  # warm-up
            probe[dtype] = product_time(a, b)
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
    say(precision.detect("cpu").line())
    with tempfile.TemporaryDirectory(prefix="hs-bench-") as tmp:
        work = Path(tmp)
        benches = {"matmul": lambda: bench_matmul(cfg, prec), "harvest": lambda: bench_harvest(cfg, prec),
                   "training step": lambda: bench_step(cfg, prec),
                   "sparse step": lambda: bench_sparsity(cfg, prec), "threads": lambda: bench_threads(cfg, prec),
                   "students": lambda: bench_distill(cfg, prec),
                   "end to end": lambda: bench_end_to_end(cfg, prec, work),
                   "growth": lambda: bench_growth(cfg, work)}
        for label in (p for p in PARTS if p in parts):
            say(f"{label} ...")
            seconds, (entries, extra) = timed(benches[label])
            results["ratios"] += entries
            if label == "growth":
                results["growth"] = extra
            elif label == "matmul":
                results["precision"] = extra
            else:
                results["checks"].update(extra)
            say(f"{label} done in {seconds:.0f} s")
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
