"""Keep freed memory in the process, so a training step's big temporaries do not page-fault afresh.

glibc serves every block above its mmap threshold (128 KiB to 32 MiB) with a fresh mmap and
returns it on free, so each step's activations, bf16 weight copies and gradients arrive as
untouched pages: thousands of page faults a step (6,000 at the default crosscoder shape,
300,000 at the paper's). `retain_freed_memory()` turns mmap off for the heap and raises the trim
threshold, so freed blocks are reused; measured by `bash run_all.sh bench` ("allocator" rows).
Numerics are untouched (results stay byte-identical). The trade: the process keeps its peak
heap until it exits, which each notebook's kernel does. A no-op off glibc (macOS, musl) and
when HIDDEN_SIGNATURES_MALLOC=default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

ENV = "HIDDEN_SIGNATURES_MALLOC"
"""Set to `default` to leave glibc's allocator as it is (for comparison or a memory-tight machine)."""
ENV_VALUES = ("retain", "default")
"""What ENV accepts (unset or empty: retain)."""
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
"""mallopt parameter numbers, from glibc's malloc.h."""
RETAINED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 256 * 2**20}
"""No mmapped blocks; keep up to 256 MiB of free memory at the heap's top rather than trimming it."""
GLIBC_DEFAULT = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024}
"""glibc's initial settings (its threshold then adapts upwards; setting it fixes it at 128 KiB)."""


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The C library if it is glibc (has mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def available() -> bool:
    """True where the settings can be changed (glibc)."""
    return _libc() is not None


def _apply(settings: dict[int, int]) -> bool:
    libc = _libc()
    return libc is not None and all(libc.mallopt(k, v) == 1 for k, v in settings.items())


class SettingError(ValueError):
    """HIDDEN_SIGNATURES_MALLOC holds something other than retain or default."""


def setting() -> str:
    """The requested setting, `retain` or `default` (checked: the runner calls this before any work)."""
    value = os.environ.get(ENV, "").strip().lower() or "retain"
    if value not in ENV_VALUES:
        raise SettingError(f"{ENV}={os.environ[ENV]!r}: accepted: {', '.join(ENV_VALUES)} (or unset)")
    return value


def retain_freed_memory() -> bool:
    """Reuse freed blocks instead of unmapping them (idempotent); True if the setting is in force."""
    return setting() == "retain" and _apply(RETAINED)


def glibc_default() -> bool:
    """Back to glibc's own settings, handing free memory back to the system; True on glibc."""
    libc = _libc()
    if libc is None or not _apply(GLIBC_DEFAULT):
        return False
    libc.malloc_trim(0)
    return True
