"""Where the sparse crosscoder step pays on this machine: `train.sparse_below: auto`, measured once and cached.

The fused ReLU+L1 step has two paths (fused_loss.py): dense matmuls over every latent, or
gathers and embedding bags over the latents that fired. Which is faster depends on the hardware
as much as on the code: on an AMX CPU a bf16 matmul is so cheap that at the default run's shape
(H 4096, batch 512) the sparse step of STEP_VERSION 1 lost to the dense one at every trained L0, and
the present one wins there only below a few percent density, by 1.2x to 1.8x and by less at two
threads than at one; on fp32 CPUs the sparse step wins by more. So `auto` times both paths here, at the run's shape
and precision, on a ladder of densities (from the sparsest up, stopping where sparse stops paying),
and takes the densest rung where the sparse step is at least MIN_GAIN faster (0: never sparse).
The result is cached per machine, torch version, thread count, step version, shape and precision (like
precision.py's bf16 probe), so reruns take the same paths and stay byte-identical.
HIDDEN_SIGNATURES_SPARSE_BELOW=<number in [0, 1]> pins it (the test suite does: a timing-dependent
path would make tiny-model runs depend on the machine's load).
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

from .. import io, precision
from . import crosscoder as cc_mod
from . import fused_loss

AUTO = "auto"
FORCE_ENV = "HIDDEN_SIGNATURES_SPARSE_BELOW"
DENSITIES = (0.002, 0.004, 0.008, 0.016, 0.031, 0.0625)
"""Densities probed (share of (token, latent) pairs that fire): L0 8 to 256 of H 4096."""
MIN_GAIN = 1.1
"""The sparse step is used up to the densest rung where it is at least this much faster than dense."""
MIN_REPEATS, MAX_REPEATS = 2, 9
RUNG_SECONDS = 1.5
"""Repeats per rung: as many as fit in about this many seconds of each path, within the bounds above."""
PROBE_L1 = 0.5


class SparseBelowError(ValueError):
    """A sparse_below setting that is neither auto nor a number in [0, 1]."""


def check(name: str, setting: object) -> None:
    """Raise SparseBelowError naming the field unless `setting` is auto or a number in [0, 1]."""
    number = isinstance(setting, (int, float)) and not isinstance(setting, bool)
    if setting != AUTO and not (number and 0.0 <= setting <= 1.0):
        raise SparseBelowError(f"{name}: {setting!r} is not accepted; accepted: auto or a number in [0, 1]")


def resolve(setting: float | str, d_a: int, d_b: int, dict_size: int, batch: int, dtype: torch.dtype,
            device: str | torch.device = "cpu") -> float:
    """The density below which a batch takes the sparse step: a number as given, `auto` as measured here."""
    check("train.sparse_below", setting)
    if setting != AUTO:
        return float(setting)
    forced = os.environ.get(FORCE_ENV)
    if forced is not None:
        return _forced(forced)
    return float(measured(d_a, d_b, dict_size, batch, dtype, torch.device(device))["sparse_below"])


def _forced(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise SparseBelowError(f"{FORCE_ENV}: {value!r} is not accepted; accepted: a number in [0, 1]")
    return number


def measured(d_a: int, d_b: int, dict_size: int, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The probe's record for this shape and precision: read from the cache, else measured and cached."""
    shape = {"d_a": d_a, "d_b": d_b, "dict_size": dict_size, "batch": batch}
    facts = {"machine": _machine(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
             "step_version": fused_loss.STEP_VERSION,
             "dtype": str(dtype).removeprefix("torch."), **shape}
    path = io.cache_root() / precision.CACHE_DIR / f"sparse-{io.config_hash(facts)}.json"
    with io.file_lock(path):  # processes of one run probing the same shape: the second reads the first's
        try:
            return io.read_json(path)
        except io.ArtifactError:
            pass
        gains = probe(d_a, d_b, dict_size, batch, dtype, device)
        record = {**facts, "gain_by_density": {str(d): g for d, g in gains.items()},
                  "min_gain": MIN_GAIN, "sparse_below": threshold(gains)}
        io.write_json(path, record, digits=4)
        return io.read_json(path)  # as written: the first run and its reruns see the same rounded numbers


def threshold(gains: dict[float, float]) -> float:
    """The densest rung at which the sparse step is >= MIN_GAIN faster, every sparser rung too; else 0."""
    below = 0.0
    for density, gain in sorted(gains.items()):
        if gain < MIN_GAIN:
            break
        below = density
    return below


def probe(d_a: int, d_b: int, dict_size: int, batch: int, dtype: torch.dtype,
          device: torch.device) -> dict[float, float]:
    """Dense / sparse time of one loss forward + backward at each density, sparsest first, until sparse
    stops paying (denser rungs only pay less)."""
    gen = torch.Generator().manual_seed(0)
    x_NA = torch.randn(batch, d_a, generator=gen).to(device)
    x_NB = torch.randn(batch, d_b, generator=gen).to(device)
    model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=d_a, d_b=d_b, dict_size=dict_size), seed=0).to(device)
    gains: dict[float, float] = {}
    for density in DENSITIES:
        if density * dict_size < 1:
            continue
        set_density(model, x_NA, x_NB, density)
        steps = {below: _step(model, x_NA, x_NB, dtype, below) for below in (1.0, 0.0)}
        warm = max(_timed(step, device) for step in steps.values())  # also the warm-up
        times: dict[float, list[float]] = {below: [] for below in steps}
        for _ in range(max(MIN_REPEATS, min(MAX_REPEATS, int(RUNG_SECONDS / max(warm, 1e-6))))):
            for below, step in steps.items():
                times[below].append(_timed(step, device))
        gains[density] = min(times[0.0]) / min(times[1.0])  # load only ever adds time: the fastest repeats
        if gains[density] < MIN_GAIN:
            break
    return gains


def set_density(model: cc_mod.Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, density: float) -> float:
    """Shift b_enc so about `density` of the (token, latent) pairs fire, as in a trained crosscoder."""
    with torch.no_grad():
        pre_NH = x_NA @ model.W_enc_A + x_NB @ model.W_enc_B
        model.b_enc.fill_(-float(torch.quantile(pre_NH.flatten()[: 1 << 24].float(), 1 - density)))
        return float((pre_NH + model.b_enc > 0).float().mean())


def _step(model: cc_mod.Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, dtype: torch.dtype,
          below: float) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        fused_loss.loss(model, x_NA, x_NB, PROBE_L1, dtype, below).total.backward()
    return step


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine(device: torch.device) -> str:
    """The CPU's name and kernel level, or the CUDA device's (what the crossover depends on)."""
    choice = precision.detect(device)
    return f"{precision.cpu_name() if device.type == 'cpu' else choice.device} {choice.capability}"
