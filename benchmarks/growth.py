"""Benchmark family "growth": peak memory of training as the store grows (a child process per size)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import torch

from benchmarks.config import RAW_SCALE, STORE_LAYER, BenchConfig
from benchmarks.end_to_end import ours_train
from benchmarks.timing import ratio_entry, reported, timed
from hidden_signatures import io
from hidden_signatures.harvest import activations


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
    code = ("import json, sys; from benchmarks.growth import memory_child; "
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
    anon_ratio = reported(memory[0]["peak_anon_mib"] / memory[1]["peak_anon_mib"])
    growth = {"per_step": per_step, "memory": memory,
              "memory_check": {"name": "peak anonymous memory, small / large store (1 = flat)",
                               "ratio": anon_ratio, "target": 0.9, "met": bool(anon_ratio >= 0.9)}}
    return entries, growth
