"""What keeping freed memory is worth: a crosscoder step and a KL student step under
`allocator.retain_freed_memory()` (what the trainers use) against glibc's default allocator.

The setting holds for a whole process (as in a training run), so each side runs in a child
process of its own that calls it as the trainers do (or not: HIDDEN_SIGNATURES_MALLOC=default),
times `repeats` steps after one warm-up, and reports its seconds, page faults per step and peak
RSS. The children alternate (retained, default, retained, default), so a busy machine slows both.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from benchmarks.config import BenchConfig
from benchmarks.growth import _high_water_rss
from benchmarks.steps import _adam, library_step, step_data, student_setup
from benchmarks.timing import Precision, ratio_entry, say
from hidden_signatures import allocator
from hidden_signatures.crosscoders import crosscoder as cc_mod
from hidden_signatures.models import distill, lm_training

SIDES = {"retained": "retain", "glibc default": "default"}
"""Each side's HIDDEN_SIGNATURES_MALLOC."""


def crosscoder_step(cfg: BenchConfig, dtype: str) -> tuple[str, Callable[[], None]]:
    """The default run's dense crosscoder step (train.py's fused step + fused Adam)."""
    batch, d, H = cfg.run_matmul
    x_NA, x_NB = step_data(batch, d, d, cfg.seed)
    model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=d, d_b=d, dict_size=H), seed=cfg.seed)
    return f"crosscoder step (dA {d}, dB {d}, H {H}, batch {batch})", library_step(
        model, _adam(model), x_NA, x_NB, dtype=dtype)


def student_step(cfg: BenchConfig, dtype: str) -> tuple[str, Callable[[], None]]:
    """One KL distillation step of the half-depth student through the shared LM step."""
    teacher, student, lm_cfg, batch_BT = student_setup(cfg, dtype)
    opt, step_fn = lm_training.make_optimizer(student, lm_cfg), distill.make_step_fn(teacher, lm_cfg, "kl")
    return (f"KL student step ({cfg.distill_seqs} x {cfg.distill_len} tokens)",
            lambda: lm_training._train_step(student, step_fn, batch_BT, 0, opt, lm_cfg))


STEPS = {"crosscoder": crosscoder_step, "student": student_step}


def child(which: str, cfg_json: str, dtype: str) -> dict:
    """In a fresh process: set the allocator as the trainers do, time the step; seconds, faults, peak RSS."""
    retained = allocator.retain_freed_memory()
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(cfg_json).items()})
    tag, step = STEPS[which](cfg, dtype)
    step()
    seconds, faults = [], []
    for _ in range(cfg.repeats):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"tag": tag, "retained": retained, "seconds": seconds, "faults": faults,
            "peak_rss_mib": _high_water_rss() / 2**20}


def _run_child(which: str, cfg: BenchConfig, dtype: str, malloc: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    env[allocator.ENV] = malloc
    code = ("import json, sys; from benchmarks.allocator import child; "
            "print(json.dumps(child(*sys.argv[1:])))")
    proc = subprocess.run([sys.executable, "-c", code, which, json.dumps(asdict(cfg)), dtype], cwd=root, env=env,
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_allocator(cfg: BenchConfig, prec: Precision) -> tuple[list[dict], dict]:
    """Ratio rows: each step with freed memory retained vs glibc's default (> 1: retaining is faster)."""
    if not allocator.available():
        say("allocator: not glibc, nothing to compare")
        return [], {"allocator": "not glibc"}
    entries, checks = [], {}
    for which in STEPS:
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for _ in range(cfg.allocator_rounds):
            for side, malloc in SIDES.items():
                runs[side].append(_run_child(which, cfg, prec.chosen, malloc))
        if not all(r["retained"] == (side == "retained") for side, rs in runs.items() for r in rs):
            raise RuntimeError("allocator bench: a child's allocator setting is not the one its side names")
        times = {side: [s for r in rs for s in r["seconds"]] for side, rs in runs.items()}
        tag = f"{runs['retained'][0]['tag']}, {prec.short}"
        entries.append(ratio_entry(f"{tag}: freed memory retained (the trainers' setting) vs glibc's default "
                                   "allocator, each in its own process", times["retained"], times["glibc default"],
                                   1.05))
        summary = {side: {"page_faults_per_step": statistics.median(f for r in rs for f in r["faults"]),
                          "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs))} for side, rs in runs.items()}
        checks[f"allocator, {tag}"] = summary
        say(f"{tag}: retained {min(times['retained']):.3f} s, glibc default {min(times['glibc default']):.3f} s; "
            f"{summary}")
    return entries, checks
