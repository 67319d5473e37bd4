"""Benchmark family "matmul": bare matrix products in each precision, the bound of every other timing."""

from __future__ import annotations

import math
import statistics
from typing import Callable

import torch

from benchmarks.config import SHORT, BenchConfig
from benchmarks.timing import Precision, matmul_operands, product_time, ratio_entry, time_interleaved


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
