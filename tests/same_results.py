"""Do two revisions give the same results, byte for byte? Runs the tiny-model end-to-end tests at each.

    python tests/same_results.py REV_BEFORE [REV_AFTER]    (REV_AFTER: the working tree)

For a change that should alter nothing (a refactor, a speed-up): each revision is checked out
into a temporary git worktree, `tests/test_e2e.py`'s tiny pair and made-model runs execute there
with their own caches, and every metrics.json and PNG they wrote is compared by sha256. Exit 0
when all are identical, 1 (listing the files) when any differ or exist on one side only.
Needs no network; takes about two end-to-end runs (~5 to 10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tiny_pair_end_to_end or made_models_end_to_end"
COMPARED = ("metrics.json", "*.png")


def digests(artifacts: Path) -> dict[str, str]:
    """sha256 of every compared file under `artifacts`, keyed by its path relative to it."""
    found = {}
    for pattern in COMPARED:
        for path in artifacts.rglob(pattern):
            if "cache" not in path.relative_to(artifacts).parts:
                found[str(path.relative_to(artifacts))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """One line per file that differs or exists on one side only (empty: identical)."""
    lines = []
    for name in sorted(set(before) | set(after)):
        if name not in after:
            lines.append(f"only before: {name}")
        elif name not in before:
            lines.append(f"only after:  {name}")
        elif before[name] != after[name]:
            lines.append(f"differs:     {name}")
    return lines


def run_tests(checkout: Path, artifacts: Path) -> None:
    """The tiny end-to-end tests of `checkout`, importing its own library, writing under `artifacts`."""
    env = dict(os.environ, HS_TEST_ARTIFACTS=str(artifacts), PYTHONPATH=str(checkout / "lib"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_e2e.py", "-k", TESTS]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: the end-to-end tests failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")


def results_of(rev: str | None, work: Path) -> dict[str, str]:
    """Digests of the results of revision `rev` (None: this working tree)."""
    artifacts = work / (rev or "working-tree") / "artifacts"
    if rev is None:
        run_tests(ROOT, artifacts)
        return digests(artifacts)
    checkout = work / rev / "checkout"
    subprocess.run(["git", "worktree", "add", "--detach", str(checkout), rev], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        run_tests(checkout, artifacts)
        return digests(artifacts)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the revision to compare against (a commit, branch or tag)")
    parser.add_argument("after", nargs="?", default=None, help="the revision to check (default: the working tree)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="same-results-") as tmp:
        before = results_of(args.before, Path(tmp))
        after = results_of(args.after, Path(tmp))
    lines = differences(before, after)
    print(f"{len(before)} files before, {len(after)} after, {len(lines)} not identical")
    print("\n".join(lines))
    return 1 if lines or not before else 0


if __name__ == "__main__":
    sys.exit(main())
