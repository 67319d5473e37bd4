"""Peak memory of a training run: this process's RSS sampled in a thread, and CUDA's peak allocation."""

from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    """Samples this process's RSS (and CUDA peak allocation) in a thread while active."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        proc = psutil.Process()
        while True:
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, float]:
        """Peak RSS in MiB (and CUDA peak allocated, when CUDA is present)."""
        out = {"peak_rss_mib": self.peak_rss / 2**20}
        if torch.cuda.is_available():
            out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out
