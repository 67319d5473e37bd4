"""Run params files end to end: validate all of them first, then execute the notebooks with papermill.

    python -m hidden_signatures.runner [--quick] [PAIR ...]

Per pair, 01_data and 02_activations run once; 03_train, 04_analysis and 05_strengths run once
per layer; 99_summary runs last over everything under results/. Executed copies land beside
the results: results/<pair>/<notebook>.ipynb and results/<pair>/<layer>/<notebook>.ipynb.
With --quick, everything goes to results-quick/ and figures-quick/ instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import params as params_mod
from . import pipeline

PAIR_NOTEBOOKS = ("00_models", "01_data", "02_activations")
LAYER_NOTEBOOKS = ("03_train", "04_analysis", "05_strengths")
REPEAT_SKIPS = ("05_strengths",)
"""Notebooks left out for the seed floor's extra seeds: they add headline metrics, not new figures."""
SUMMARY_NOTEBOOK = "99_summary"
DISTILL_NOTEBOOK = "06_distill"
DISTILL_PAIRS = ("distill-kl", "distill-jacobian")
VALIDATION_NOTEBOOK = "07_validation"
DEFAULT_PAIRS_FILE = "default_pairs.txt"
QUICK_RESULTS, QUICK_FIGURES = "results-quick", "figures-quick"


def default_pairs(params_dir: Path) -> list[str]:
    """The pairs `run_all.sh` runs with no arguments: params/default_pairs.txt, one per line."""
    path = params_dir / DEFAULT_PAIRS_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def execute(notebook: Path, output: Path, parameters: dict, cwd: Path) -> None:
    """Execute a Jupytext .py notebook with papermill into an executed .ipynb."""
    import jupytext
    import papermill

    nb = jupytext.read(notebook)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    output.parent.mkdir(parents=True, exist_ok=True)
    # papermill writes the notebook as it goes: a failed run leaves the failing cell to read.
    papermill.execute_notebook(nb, str(output), parameters=parameters, cwd=str(cwd),
                               kernel_name="python3", progress_bar=False, log_output=True,
                               stdout_file=sys.stdout, stderr_file=sys.stderr)


def plan(paths: list[Path], quick: bool) -> list[tuple[Path, params_mod.RunConfig, dict]]:
    """Load and validate every params file before running anything (fail fast, one line)."""
    out = []
    for path in paths:
        run = params_mod.load(path, quick=quick)
        layers = pipeline.validate(run)
        out.append((path, run, layers))
    return out


def quick_roots(quick: bool) -> None:
    """--quick writes to results-quick/ and figures-quick/ (unless the roots are set), never over a full run."""
    if quick:
        os.environ.setdefault(pipeline.RESULTS_ENV, QUICK_RESULTS)
        os.environ.setdefault(pipeline.FIGURES_ENV, QUICK_FIGURES)


def run_pair(path: Path, run: params_mod.RunConfig, layers: dict, notebooks_dir: Path, quick: bool,
             cwd: Path) -> None:
    base = {"params_file": str(path.resolve()), "quick": quick}
    out_dir = pipeline.results_root() / run.name
    for name in PAIR_NOTEBOOKS:
        _run_one(notebooks_dir / f"{name}.py", out_dir / f"{name}.ipynb", base, cwd)
    all_points = pipeline.points(run)
    for label in layers:  # train every crosscoder of a layer first, so 04 can set them side by side
        mine = [p for p in all_points if p.label == label]
        for name in LAYER_NOTEBOOKS:
            for point in mine:
                if point.repeat and name in REPEAT_SKIPS:
                    continue
                _run_one(notebooks_dir / f"{name}.py", out_dir / point.name / f"{name}.ipynb",
                         {**base, "layer": point.name}, cwd)


def _run_one(notebook: Path, output: Path, parameters: dict, cwd: Path) -> None:
    if not notebook.exists():
        return
    t0 = time.perf_counter()
    print(f"== {notebook.stem} {parameters.get('layer', '')} -> {output}", flush=True)
    execute(notebook, output, parameters, cwd)
    print(f"   done in {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hidden_signatures.runner", description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="*", help="params names (params/<name>.yaml) or paths; default: "
                        "the pairs listed in params/default_pairs.txt")
    parser.add_argument("--quick", action="store_true", help="apply each params file's quick overrides")
    parser.add_argument("--params-dir", default="params", type=Path)
    parser.add_argument("--notebooks-dir", default="notebooks", type=Path)
    parser.add_argument("--no-summary", action="store_true",
                        help="skip the notebooks over all pairs (06_distill, 07_validation, 99_summary)")
    args = parser.parse_args(argv)
    cwd = Path.cwd()
    quick_roots(args.quick)
    try:
        names = args.pairs or default_pairs(args.params_dir)
        if not names:
            raise params_mod.ParamsError(f"no pairs given and {args.params_dir / DEFAULT_PAIRS_FILE} lists none")
        paths = [params_mod.find_params(n, args.params_dir) for n in names]
        runs = plan(paths, args.quick)
    except params_mod.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    for path, run, layers in runs:
        run_pair(path, run, layers, args.notebooks_dir, args.quick, cwd)
    names_run = {run.name: path for path, run, _ in runs}
    if not args.no_summary and all(name in names_run for name in DISTILL_PAIRS):
        _run_one(args.notebooks_dir / f"{DISTILL_NOTEBOOK}.py", pipeline.results_root() / f"{DISTILL_NOTEBOOK}.ipynb",
                 {"kl_params": str(names_run[DISTILL_PAIRS[0]].resolve()),
                  "jacobian_params": str(names_run[DISTILL_PAIRS[1]].resolve()), "quick": args.quick}, cwd)
    if not args.no_summary:
        _run_one(args.notebooks_dir / f"{VALIDATION_NOTEBOOK}.py",
                 pipeline.results_root() / f"{VALIDATION_NOTEBOOK}.ipynb", {"quick": args.quick}, cwd)
        _run_one(args.notebooks_dir / f"{SUMMARY_NOTEBOOK}.py",
                 pipeline.results_root() / f"{SUMMARY_NOTEBOOK}.ipynb", {"quick": args.quick}, cwd)
    print(f"all done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
