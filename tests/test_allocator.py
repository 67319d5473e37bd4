"""allocator.retain_freed_memory: freed blocks are reused (no fresh page faults), the opt-out works.

Each case runs in a child process, since the setting holds for the whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from hidden_signatures import allocator

pytestmark = pytest.mark.skipif(not allocator.available(), reason="the setting is glibc's (mallopt)")

MIB = 64
"""Block size: glibc's default mmaps every block above 32 MiB afresh, however often it is freed."""
CHILD = f"""
MIB = {MIB}
import json, resource, sys, torch
from hidden_signatures import allocator
applied = allocator.retain_freed_memory() if sys.argv[1] == "retain" else allocator.glibc_default()
def churn():  # what a training step does: big temporaries made and freed
    for _ in range(3):
        t = torch.ones(MIB * 2**20 // 4)  # above the 32 MiB up to which glibc's own threshold adapts
        del t
for _ in range(10):  # the heap settles within a few blocks (posix_memalign's offsets), as in a run's first steps
    churn()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
print(json.dumps({{"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}}))
"""
PAGES = 15 * MIB * 2**20 // 4096
"""Pages the 15 measured blocks touch (4 KiB pages)."""


def run_child(mode: str, **env: str) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    full_env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")]), **env)
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=full_env, stdout=subprocess.PIPE, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_retained_memory_is_reused_where_glibc_default_faults_it_in_afresh():
    retained, default = run_child("retain"), run_child("default")
    assert retained["applied"] is True and default["applied"] is True
    assert default["faults"] > PAGES // 2, default  # glibc maps each block afresh: every page faults
    assert retained["faults"] < PAGES // 20, retained  # reused: next to none


def test_the_opt_out_leaves_glibc_alone():
    child = run_child("retain", **{allocator.ENV: "default"})
    assert child["applied"] is False
    assert child["faults"] > PAGES // 2, child


def test_retain_is_idempotent_in_process():
    assert allocator.retain_freed_memory() is True and allocator.retain_freed_memory() is True


def test_a_bad_setting_is_named_with_what_is_accepted(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ValueError, match=r"HIDDEN_SIGNATURES_MALLOC='jemalloc': accepted: retain, default"):
        allocator.retain_freed_memory()
