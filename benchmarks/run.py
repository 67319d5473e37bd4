"""Speed benchmarks: our harvest and training against the original's approach, as same-run ratios.

Every reported number is a ratio of two timings taken in one process on the same tokens or
tensors, interleaved round-robin after a warm-up (median of repeats), so a busy machine slows
both sides alike. Each ratio entry reads: ratio = baseline_s / ours_s (> 1: ours is faster).

"Ours" runs in the precision `dtype: auto` picks on this machine (`precision.resolve("auto",
"cpu")`: bf16 on a CPU with AMX / AVX512-BF16, fp32 on an AVX2-only one), and every bound (bare
matmuls, plain forward) is taken in that same precision.

    python -m benchmarks.run [--quick] [--out DIR] [--name STEM] [--only PARTS] [--emulate-avx2]

writes DIR/STEM.json and DIR/STEM.md (default: this folder, results) and prints the table.
--emulate-avx2 reruns it with oneDNN, MKL and torch held to AVX2 (an approximation of an
AVX2-only CPU; default STEM results-avx2-emulated).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.allocator import bench_allocator
from benchmarks.config import SHORT, STORE_LAYER, BenchConfig  # noqa: F401  (run.SHORT, run.STORE_LAYER, as before)
from benchmarks.end_to_end import bench_end_to_end
from benchmarks.growth import bench_growth, make_store  # noqa: F401  (run.make_store, as before)
from benchmarks.harvest import bench_harvest
from benchmarks.matmul import bench_matmul
from benchmarks.report import EMULATE_AVX2, load_average, machine_info, to_markdown
from benchmarks.steps import bench_distill, bench_sparsity, bench_step, bench_threads
from benchmarks.timing import DIGITS, Precision, say, timed
from hidden_signatures import allocator, io, precision

RESULTS_STEM = "results"
RESULTS_JSON = f"{RESULTS_STEM}.json"
RESULTS_MD = f"{RESULTS_STEM}.md"
PARTS = ("matmul", "harvest", "training step", "sparse step", "threads", "students", "allocator", "end to end",
         "growth")
EMULATED_STEM = "results-avx2-emulated"


# -- 1. harvest -------------------------------------------------------------------------


# -- 3. end to end ----------------------------------------------------------------------


# -- 4. growth --------------------------------------------------------------------------


# -- report -----------------------------------------------------------------------------


def run(cfg: BenchConfig, out_dir: Path, stem: str = RESULTS_STEM, parts: tuple[str, ...] = PARTS) -> dict:
    """Run the benchmarks in `parts`; write out_dir/STEM.json and STEM.md; return the results."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"bench parts {unknown}: accepted: {', '.join(PARTS)}")
    prec = Precision(precision.resolve("auto", "cpu"), float(cfg.bf16_budget_s))
    allocator.retain_freed_memory()  # every row in the trainers' allocator setting ("allocator" compares)
    results: dict = {"machine": machine_info(), "config": asdict(cfg), "ratios": [], "checks": {}}
    say(precision.detect("cpu").line())
    with tempfile.TemporaryDirectory(prefix="hs-bench-") as tmp:
        work = Path(tmp)
        benches = {"matmul": lambda: bench_matmul(cfg, prec), "harvest": lambda: bench_harvest(cfg, prec),
                   "training step": lambda: bench_step(cfg, prec),
                   "sparse step": lambda: bench_sparsity(cfg, prec), "threads": lambda: bench_threads(cfg, prec),
                   "students": lambda: bench_distill(cfg, prec),
                   "allocator": lambda: bench_allocator(cfg, prec),
                   "end to end": lambda: bench_end_to_end(cfg, prec, work),
                   "growth": lambda: bench_growth(cfg, work)}
        for label in (p for p in PARTS if p in parts):
            say(f"{label} ...")
            seconds, (entries, extra) = timed(benches[label])
            results["ratios"] += entries
            if label == "growth":
                results["growth"] = extra
            elif label == "matmul":
                results["precision"] = extra
            else:
                results["checks"].update(extra)
            say(f"{label} done in {seconds:.0f} s")
    results["skipped"] = prec.skipped or []
    results["machine"]["load_average_end"] = load_average()
    io.write_json(out_dir / f"{stem}.json", results, digits=DIGITS)
    io.write_text(out_dir / f"{stem}.md", to_markdown(results))
    return results


def main(argv: list[str] | None = None) -> dict:
    """Command line: parse, run (under the AVX2 emulation in a child process if asked), print the table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrink every size (about 1-2 minutes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder for the results (default: benchmarks/)")
    parser.add_argument("--name", default=None,
                        help=f"file stem of the results: STEM.json, STEM.md (default: results, "
                             f"or {EMULATED_STEM} with --emulate-avx2)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma-separated benchmarks to run (default: all of %(default)s)")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run with torch, oneDNN and MKL held to AVX2 (" +
                             " ".join(f"{k}={v}" for k, v in EMULATE_AVX2.items()) + ")")
    parser.add_argument("--model", default=BenchConfig.model, help="model spec (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement (default 3; more steadies a busy machine)")
    args = parser.parse_args(argv)
    stem = args.name or (EMULATED_STEM if args.emulate_avx2 else RESULTS_STEM)
    if args.emulate_avx2 and any(os.environ.get(k) != v for k, v in EMULATE_AVX2.items()):
        # The kernel levels are fixed when torch and oneDNN load: rerun in a fresh process.
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ, **EMULATE_AVX2)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "benchmarks.run", *argv, "--name", stem, "--out", str(args.out.resolve())]
        subprocess.run(cmd, cwd=root, env=env, check=True)
        return io.read_json(args.out / f"{stem}.json")
    parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
    cfg = BenchConfig(model=args.model)
    cfg = cfg.quick() if args.quick else cfg
    results = run(replace(cfg, repeats=args.repeats) if args.repeats else cfg, args.out, stem, parts)
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
