"""Run params files end to end: validate all of them first, then execute the notebooks with papermill.

    python -m hidden_signatures.runner [--quick] [PAIR ...]

Per pair, 00_models, 01_data and 02_activations run once, in order; then 03_train, 04_analysis
and 05_strengths run once per crosscoder, `--jobs` at a time (see schedule.py); 06_distill and
07_validation, then 99_summary, run last over everything under results/. Executed copies land beside
the results: results/<pair>/<notebook>.ipynb and results/<pair>/<layer>/<notebook>.ipynb.
With --quick, everything goes to results-quick/ and figures-quick/ instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from . import params as params_mod
from . import pipeline, schedule

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
    """Execute a Jupytext .py notebook with papermill into an executed .ipynb.

    The kernel talks over Unix sockets in a private temporary directory, not TCP ports: kernels
    started side by side (schedule.py) cannot race for a port, and nothing listens on the network.
    """
    import jupytext
    import papermill
    from traitlets.config import Config

    nb = jupytext.read(notebook)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hs-kernel-") as sockets:  # one private socket dir per kernel
        ipc = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "kernel")}})
        # papermill writes the notebook as it goes: a failed run leaves the failing cell to read.
        papermill.execute_notebook(nb, str(output), parameters=parameters, cwd=str(cwd),
                                   kernel_name="python3", progress_bar=False, log_output=True,
                                   stdout_file=sys.stdout, stderr_file=sys.stderr, config=ipc)


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
             cwd: Path, jobs: int = 1) -> None:
    """The pair's notebooks in order, then every crosscoder's 03/04/05, `jobs` at a time."""
    base = {"params_file": str(path.resolve()), "quick": quick}
    out_dir = pipeline.results_root() / run.name
    for name in PAIR_NOTEBOOKS:
        _run_one(notebooks_dir / f"{name}.py", out_dir / f"{name}.ipynb", base, cwd)
    run_tasks(point_tasks(run, layers, notebooks_dir, base), jobs, cwd)


def point_tasks(run: params_mod.RunConfig, layers: dict, notebooks_dir: Path, base: dict) -> list[schedule.Task]:
    """Train every crosscoder first (longest work first), then each layer's analyses once all its
    crosscoders exist (04 sets them side by side), then each one's 05 after its 04."""
    out_dir = pipeline.results_root() / run.name
    all_points = pipeline.points(run)
    trains, later = [], []
    for label in layers:
        mine = [p for p in all_points if p.label == label]
        layer_trains = [f"03_train {p.name}" for p in mine]
        for name in LAYER_NOTEBOOKS:
            for point in mine:
                if point.repeat and name in REPEAT_SKIPS:
                    continue
                after = {"03_train": (), "04_analysis": tuple(layer_trains),
                         "05_strengths": (f"04_analysis {point.name}",)}[name]
                task = schedule.Task(f"{name} {point.name}", notebooks_dir / f"{name}.py",
                                     out_dir / point.name / f"{name}.ipynb", {**base, "layer": point.name}, after)
                (trains if name == "03_train" else later).append(task)
    return [t for t in trains + later if t.notebook.exists()]


def summary_tasks(names_run: dict[str, Path], notebooks_dir: Path, quick: bool) -> list[schedule.Task]:
    """06_distill (when both distillation pairs ran) and 07_validation side by side, then 99_summary."""
    root = pipeline.results_root()
    tasks = []
    if all(name in names_run for name in DISTILL_PAIRS):
        tasks.append(schedule.Task(DISTILL_NOTEBOOK, notebooks_dir / f"{DISTILL_NOTEBOOK}.py",
                                   root / f"{DISTILL_NOTEBOOK}.ipynb",
                                   {"kl_params": str(names_run[DISTILL_PAIRS[0]].resolve()),
                                    "jacobian_params": str(names_run[DISTILL_PAIRS[1]].resolve()), "quick": quick}))
    tasks.append(schedule.Task(VALIDATION_NOTEBOOK, notebooks_dir / f"{VALIDATION_NOTEBOOK}.py",
                               root / f"{VALIDATION_NOTEBOOK}.ipynb", {"quick": quick}))
    tasks.append(schedule.Task(SUMMARY_NOTEBOOK, notebooks_dir / f"{SUMMARY_NOTEBOOK}.py",
                               root / f"{SUMMARY_NOTEBOOK}.ipynb", {"quick": quick},
                               tuple(t.name for t in tasks)))
    return [t for t in tasks if t.notebook.exists()]


def run_tasks(tasks: list[schedule.Task], jobs: int, cwd: Path) -> None:
    """Side by side in their own processes when jobs > 1; else one after another, output streamed here."""
    if jobs > 1:
        schedule.run_tasks(tasks, jobs, cwd)
        return
    schedule.check_order(tasks)
    for task in tasks:
        _run_one(task.notebook, task.output, task.parameters, cwd)


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
    parser.add_argument("--jobs", type=int, default=schedule.default_jobs(),
                        help="crosscoders trained and analysed side by side, each with cores/jobs threads "
                             f"(default here: {schedule.default_jobs()}; 1 runs everything in order)")
    parser.add_argument("--no-summary", action="store_true",
                        help="skip the notebooks over all pairs (06_distill, 07_validation, 99_summary)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: must be at least 1", file=sys.stderr)
        return 2
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
    try:
        for path, run, layers in runs:
            run_pair(path, run, layers, args.notebooks_dir, args.quick, cwd, args.jobs)
        if not args.no_summary:
            names_run = {run.name: path for path, run, _ in runs}
            run_tasks(summary_tasks(names_run, args.notebooks_dir, args.quick), args.jobs, cwd)
    except schedule.TaskFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"all done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
