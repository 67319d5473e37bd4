"""Which float precision this machine computes fastest: bf16 where the hardware has it natively, else fp32.

bf16 matmuls are 3-4x faster than fp32 on CPUs with AMX (and faster on AVX512-BF16 CPUs and
recent GPUs), but about 4x slower on AVX2-only CPUs, where they are emulated. Every `dtype: auto`
in params (harvest, crosscoder training, fine-tune, distillation, splice-in) resolves here:
CUDA with bf16 support -> bfloat16; a CPU -> bfloat16 only when torch dispatches AVX512 kernels,
the CPU reports AMX or AVX512-BF16, and a small bf16-vs-fp32 matmul benchmark (measured once
per machine and cached) confirms bf16 is faster; fp32 everywhere else. An explicit bfloat16 or
float32 in params always wins; HIDDEN_SIGNATURES_PRECISION=float32|bfloat16 forces the auto choice.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from . import io

AUTO = "auto"
DTYPES = ("bfloat16", "float32")
SETTINGS = (AUTO, *DTYPES)
FORCE_ENV = "HIDDEN_SIGNATURES_PRECISION"
AMX_ENV = "HIDDEN_SIGNATURES_AMX"
"""1 or 0: take the CPU as having AMX tiles or not (for params' `bf16_without_amx` budgets; tests pin it)."""
CACHE_DIR = "precision"
MIN_SPEEDUP = 1.3
"""bf16 is chosen on a CPU only when its matmul is at least this much faster than fp32's."""
MATMUL_SHAPE = (512, 576, 1536)
"""(m, k, n) of the micro-benchmark: a crosscoder batch of 512 through a 576-wide encoder block."""


class PrecisionError(ValueError):
    """A precision setting that is not auto, bfloat16 or float32."""


@dataclass(frozen=True)
class Choice:
    """What `auto` resolves to on one device, and the facts it rests on (recorded beside results)."""

    device: str
    capability: str
    """torch's CPU kernel level (AVX512, AVX2, DEFAULT, ...) or the CUDA device's name and compute capability."""
    bf16_native: bool
    dtype: str
    reason: str
    bf16_speedup: float | None = None
    """fp32 / bf16 matmul time measured on this machine (None where not measured)."""

    def record(self) -> dict:
        """The stable facts for metrics.json and the summary (no timings: reruns stay byte-identical)."""
        return {"device": self.device, "capability": self.capability, "bf16_native": self.bf16_native}

    def line(self) -> str:
        """One line for the start of a run: device, capability, precision chosen and why."""
        return f"device {self.device}, capability {self.capability}: precision {self.dtype} ({self.reason})"


def check(name: str, setting: str) -> None:
    """Raise PrecisionError naming the field unless `setting` is auto, bfloat16 or float32."""
    if setting not in SETTINGS:
        raise PrecisionError(f"{name}: {setting!r} is not accepted; accepted: {', '.join(SETTINGS)}")


def resolve(setting: str, device: str | torch.device = "cpu") -> str:
    """`bfloat16` or `float32`: an explicit setting as given, `auto` as this device computes fastest."""
    check("dtype", setting)
    return detect(device).dtype if setting == AUTO else setting


def torch_dtype(setting: str, device: str | torch.device = "cpu") -> torch.dtype:
    return getattr(torch, resolve(setting, device))


def detect(device: str | torch.device = "cpu") -> Choice:
    """The auto choice for `device` (cached per process; a CPU's benchmark also on disk)."""
    device = torch.device(device)
    forced = os.environ.get(FORCE_ENV)
    if forced:
        if forced not in DTYPES:
            raise PrecisionError(f"{FORCE_ENV}: {forced!r} is not accepted; accepted: {', '.join(DTYPES)}")
        base = _detect_cuda(device) if device.type == "cuda" else _detect_cpu()
        return Choice(base.device, base.capability, base.bf16_native, forced, f"forced by {FORCE_ENV}",
                      base.bf16_speedup)
    return _detect_cuda(device) if device.type == "cuda" else _detect_cpu()


def _detect_cuda(device: torch.device) -> Choice:
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    capability = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    native = bool(torch.cuda.is_bf16_supported())
    reason = "CUDA device computes bf16 natively" if native else "CUDA device without bf16 support"
    return Choice(f"cuda:{index}", capability, native, "bfloat16" if native else "float32", reason)


def cpu_features() -> dict:
    """torch's CPU kernel level and the CPU's bf16 features (AMX tiles, AVX512-BF16), as torch sees them."""
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return {"capability": torch.backends.cpu.get_cpu_capability(), "amx": bool(amx),
            "avx512_bf16": bool(avx512_bf16)}


@functools.lru_cache(maxsize=1)
def _detect_cpu() -> Choice:
    feats = cpu_features()
    capability = feats["capability"] + _feature_note(feats)
    native = feats["capability"].startswith("AVX512") and (feats["amx"] or feats["avx512_bf16"])
    if not native:
        why = ("no AMX or AVX512-BF16" if not (feats["amx"] or feats["avx512_bf16"])
               else f"torch dispatches {feats['capability']} kernels, not AVX512")
        return Choice("cpu", capability, False, "float32", f"{why}: bf16 would be emulated, fp32 is faster")
    speedup = bf16_speedup(feats)
    if speedup < MIN_SPEEDUP:
        return Choice("cpu", capability, True, "float32",
                      f"bf16 matmul only {speedup:.2f}x fp32 here (< {MIN_SPEEDUP}x)", speedup)
    return Choice("cpu", capability, True, "bfloat16", f"bf16 matmul {speedup:.1f}x faster than fp32 here", speedup)


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (bf16 matmuls ~5x fp32, not ~2x as with AVX512-BF16 alone)."""
    forced = os.environ.get(AMX_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise PrecisionError(f"{AMX_ENV}: {forced!r} is not accepted; accepted: 0, 1")
        return forced == "1"
    return cpu_features()["amx"]


def _feature_note(feats: dict) -> str:
    names = [n for n, key in (("AMX", "amx"), ("AVX512-BF16", "avx512_bf16")) if feats[key]]
    return f" ({', '.join(names)})" if names else " (no AMX, no AVX512-BF16)"


def bf16_speedup(feats: dict | None = None) -> float:
    """fp32 / bf16 time of the micro-benchmark matmul, measured once per machine and thread count, cached."""
    feats = feats or cpu_features()
    key = io.config_hash({"cpu": cpu_name(), "features": feats, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "shape": MATMUL_SHAPE})
    path = io.cache_root() / CACHE_DIR / f"{key}.json"
    try:
        return float(io.read_json(path)["bf16_speedup"])
    except (io.ArtifactError, KeyError, TypeError, ValueError):
        pass
    speedup = round(matmul_time("float32") / matmul_time("bfloat16"), 3)
    io.write_json(path, {"bf16_speedup": speedup, "cpu": cpu_name(), **feats,
                         "threads": torch.get_num_threads(), "shape": list(MATMUL_SHAPE)})
    return speedup


def matmul_time(dtype: str, shape: tuple[int, int, int] = MATMUL_SHAPE, repeats: int = 7) -> float:
    """Median seconds of one [m, k] @ [k, n] matmul in `dtype` on the CPU (after a warm-up)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(getattr(torch, dtype))
    b = torch.randn(k, n, generator=gen).to(getattr(torch, dtype))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        times.append((time.perf_counter() - t0) / 4)
    return sorted(times)[len(times) // 2]


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_device(device: str = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else must be a valid torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: {device!r} is not a device; accepted: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not supported; accepted: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available; use auto or cpu")
    return dev


def summary(device: str | torch.device = "cpu") -> dict:
    """Everything known about the auto choice, timings included (for benchmarks, not for metrics.json)."""
    return asdict(detect(device))


def main() -> None:
    """Print the start-of-run line for the default device (`python -m hidden_signatures.precision`)."""
    print(detect(pick_device("auto")).line())


if __name__ == "__main__":
    main()
