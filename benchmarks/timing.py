"""How benchmarks time: interleaved repeats, ratio rows, and the precision a run measures in."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.config import SHORT

DIGITS = 4
"""Significant digits of every float in results.json; `met` is judged on the ratio as written."""


def reported(x: float) -> float:
    """`x` as results.json will hold it, so a row's `met` agrees with the ratio a reader sees."""
    return float(f"{x:.{DIGITS}g}")


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
    ratio = reported(baseline_s / ours_s)
    return {"name": name, "ours_s": ours_s, "baseline_s": baseline_s, "ratio": ratio,
            "ratio_of_mins": min(base_l) / min(ours_l), "repeats": len(ours_l),
            "target": target, "met": bool(ratio >= target)}


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


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
        say(f"not timed: {name} ({self.skipped[-1]['reason']})")
        return False


def _bf16_rate(shape: tuple[int, int, int]) -> float:
    """Seconds per multiply-add of one bf16 [m, k] @ [k, n] matmul (after a warm-up)."""
    a, b = matmul_operands(shape, torch.bfloat16)
    a @ b
    return product_time(a, b) / math.prod(shape)


def product_time(a: torch.Tensor, b: torch.Tensor, min_s: float = 0.02) -> float:
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


def matmul_operands(shape: tuple[int, int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    return torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)

