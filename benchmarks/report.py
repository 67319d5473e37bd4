"""The benchmark report: the machine it ran on, and the results as a markdown table."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from hidden_signatures import precision

EMULATE_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""Environment that holds torch's kernels, oneDNN and MKL to AVX2: an approximation of an AVX2-only
CPU on an AMX one (harsher on bf16, which it emulates about 40x slower than fp32, than a real one's 4x)."""



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
            "load_average": load_average()}


def load_average() -> list[float] | None:
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
    probe_s = results.get("checks", {}).get("e2e_sparse_probe_s")
    if probe_s is not None:
        lines += ["", f"End to end: the sparse step's crossover at its shape (measured once per machine and "
                  f"shape, then cached) was resolved before the timed part, in {probe_s:.1f} s (near 0: cached)."]
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
