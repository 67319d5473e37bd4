"""Run params files end to end: validate all of them first, then execute the notebooks with papermill.

    python -m hidden_signatures.runner [--quick] [PAIR ...]

Per pair, 00_models, 01_data and 02_activations run once, in order; then 03_train, 04_analysis
and 05_strengths run once per crosscoder. All pairs' notebooks form one task graph run `--jobs`
at a time (see schedule.py), so one pair's set-up overlaps another's training; 07_validation
fills idle slots, 06_distill follows the distillation pairs, and 99_summary runs last over
everything under results/. Executed copies land beside
the results: results/<pair>/<notebook>.ipynb and results/<pair>/<layer>/<notebook>.ipynb.
With --quick, everything goes to results-quick/ and figures-quick/ instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from .. import allocator
from . import derived, pipeline, schedule
from . import params as params_mod
from .notebooks import execute

PAIR_NOTEBOOKS = ("00_models", "01_data", "02_activations")
LAYER_NOTEBOOKS = ("03_train", "04_analysis", "05_strengths")
REPEAT_SKIPS = ("05_strengths",)
"""Notebooks left out for the seed floor's extra seeds: they add headline metrics, not new figures."""
SUMMARY_NOTEBOOK = "99_summary"
DISTILL_NOTEBOOK = "06_distill"
DISTILL_PAIRS = ("distill-kl", "distill-jacobian")
DISTILL_READS = DISTILL_PAIRS + ("distill-kl-vs-jacobian",)
"""Pairs whose results 06_distill reads (the last one when it ran)."""
VALIDATION_NOTEBOOK = "07_validation"
DEFAULT_PAIRS_FILE = "default_pairs.txt"
QUICK_RESULTS, QUICK_FIGURES = "results-quick", "figures-quick"


def default_pairs(params_dir: Path) -> list[str]:
    """The pairs `run_all.sh` runs with no arguments: params/default_pairs.txt, one per line."""
    path = params_dir / DEFAULT_PAIRS_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def plan(paths: list[Path], quick: bool) -> list[tuple[Path, params_mod.RunConfig, dict]]:
    """Load and validate every params file before running anything (fail fast, one line)."""
    out = []
    for path in paths:
        run = params_mod.load(path, quick=quick)
        layers = pipeline.validate(run)
        say_cpu_budget(run, params_mod.load(path, quick=quick, overlays=False))
        out.append((path, run, layers))
    return out


WHY_OVERLAY = {"fp32_cpu": "this CPU computes bf16 slowly, so fp32 and",
               "bf16_without_amx": "this CPU computes bf16 without AMX tiles (about 2x fp32, not 5x), so"}


def say_cpu_budget(run: params_mod.RunConfig, plain: params_mod.RunConfig) -> None:
    """One line when a CPU-class section of the params (fp32_cpu, bf16_without_amx) is in force,
    naming what it changes in this run (`plain`: the same file loaded without it)."""
    for name in params_mod.OVERLAYS:
        if getattr(run, name) and params_mod.overlay_applies(run, name):
            changes = ", ".join(params_mod.changed_lines(plain, run)) or "nothing differs from the file's own values"
            print(f"[runner] {run.name}: {WHY_OVERLAY[name]} the params' {name} budgets apply: {changes}",
                  flush=True)


def quick_roots(quick: bool) -> None:
    """--quick writes to results-quick/ and figures-quick/ (unless the roots are set), never over a full run."""
    if quick:
        os.environ.setdefault(pipeline.RESULTS_ENV, QUICK_RESULTS)
        os.environ.setdefault(pipeline.FIGURES_ENV, QUICK_FIGURES)


def all_tasks(runs: list[tuple[Path, params_mod.RunConfig, dict]], notebooks_dir: Path, quick: bool,
              summary: bool = True) -> list[schedule.Task]:
    """Every notebook of the run as one task graph, in priority order (see schedule.run_tasks).

    00_models first, the ones that build the dearest made models ahead (longest job first: the
    Jacobian student sets the run's critical path); each waits only for the 00_models of the
    pairs that first name its models (a model is converted or built once). Then the pair set-ups:
    they unblock the most work, and the next pair's set-up runs beside the previous pair's
    crosscoders instead of after them. Then every crosscoder's training, then the analyses,
    then the notebooks over all pairs.
    """
    models, setup, trains, later, by_pair, first_named, cost = [], [], [], [], {}, {}, {}
    for path, run, layers in runs:
        base = {"params_file": str(path.resolve()), "quick": quick}
        after = _model_owners(run, first_named)
        pair = pair_tasks(run, notebooks_dir, base, after)
        owned = [spec for spec in dict.fromkeys((run.model_a, run.model_b)) if spec not in first_named]
        cost[pair[0].name] = build_cost(owned)
        for spec in owned:
            first_named[spec] = pair[0].name
        points = point_tasks(run, layers, notebooks_dir, base, after=pair[-1:])
        models.append(pair[0])
        setup += pair[1:]
        trains += [t for t in points if t.notebook.stem == "03_train"]
        later += [t for t in points if t.notebook.stem != "03_train"]
        by_pair[run.name] = pair + points
    tasks = _dearest_first(models, cost) + setup + trains + later
    if summary:
        tasks += summary_tasks({run.name: path for path, run, _ in runs}, by_pair, notebooks_dir, quick)
    return _present(tasks)


BUILD_COST = {"distill-jacobian": 3, "distill-kl": 2, "finetune": 1}
"""Relative cost of building each kind of made model (the Jacobian student's steps are dearest)."""


def build_cost(specs: list[str]) -> int:
    """What building these models costs, relatively: the sum over the made ones (0: none)."""
    return sum(BUILD_COST.get(derived.parse(spec)[0], 1) for spec in specs if derived.is_derived(spec))


def _dearest_first(tasks: list[schedule.Task], cost: dict[str, int]) -> list[schedule.Task]:
    """`tasks` in dependency order, the dearest ready one next each time (ties: the given order)."""
    placed, out, pending = set(), [], list(tasks)
    names = {t.name for t in tasks}
    while pending:
        ready = [t for t in pending if all(d in placed or d not in names for d in t.after)]
        pick = max(ready, key=lambda t: cost[t.name])  # max keeps the first of equals
        out.append(pick)
        placed.add(pick.name)
        pending.remove(pick)
    return out


def _model_owners(run: params_mod.RunConfig, first_named: dict[str, str]) -> tuple[str, ...]:
    """The 00_models tasks of earlier pairs that first named one of this pair's models."""
    return tuple(dict.fromkeys(first_named[s] for s in (run.model_a, run.model_b) if s in first_named))


def pair_tasks(run: params_mod.RunConfig, notebooks_dir: Path, base: dict,
               models_after: tuple[str, ...] = ()) -> list[schedule.Task]:
    """00_models, 01_data, 02_activations of one pair, in order; 00_models after the tasks named
    in `models_after` (those that convert or build a model this pair shares). Two harvests of one
    store: see activations.harvest."""
    out_dir = pipeline.results_root() / run.name
    tasks: list[schedule.Task] = []
    for name in PAIR_NOTEBOOKS:
        after = tuple(t.name for t in tasks[-1:]) if tasks else models_after
        tasks.append(schedule.Task(f"{run.name} {name}", notebooks_dir / f"{name}.py",
                                   out_dir / f"{name}.ipynb", dict(base), after))
    return tasks


def point_tasks(run: params_mod.RunConfig, layers: dict, notebooks_dir: Path, base: dict,
                after: list[schedule.Task] = ()) -> list[schedule.Task]:
    """Every crosscoder's training first (longest first), after `after` (the pair's set-up); then
    each layer's analyses once all its crosscoders exist (04 sets them side by side), then each
    one's 05 after its 04."""
    out_dir = pipeline.results_root() / run.name
    all_points = sorted(pipeline.points(run), key=lambda p: -p.train.tokens)  # stable: else params order
    trains, later = [], []
    for label in layers:
        mine = [p for p in all_points if p.label == label]
        layer_trains = tuple(f"{run.name} 03_train {p.name}" for p in mine)
        for name in LAYER_NOTEBOOKS:
            for point in mine:
                if point.repeat and name in REPEAT_SKIPS:
                    continue
                needs = {"03_train": tuple(t.name for t in after), "04_analysis": layer_trains,
                         "05_strengths": (f"{run.name} 04_analysis {point.name}",)}[name]
                task = schedule.Task(f"{run.name} {name} {point.name}", notebooks_dir / f"{name}.py",
                                     out_dir / point.name / f"{name}.ipynb", {**base, "layer": point.name}, needs)
                (trains if name == "03_train" else later).append(task)
    order = [p.name for p in all_points]
    trains.sort(key=lambda t: order.index(t.parameters["layer"]))
    return trains + later


def summary_tasks(names_run: dict[str, Path], by_pair: dict[str, list[schedule.Task]], notebooks_dir: Path,
                  quick: bool) -> list[schedule.Task]:
    """07_validation (it needs nothing, so it fills idle slots), 06_distill once the distillation
    pairs are done (when both ran), and 99_summary after everything."""
    root = pipeline.results_root()
    tasks = [schedule.Task(VALIDATION_NOTEBOOK, notebooks_dir / f"{VALIDATION_NOTEBOOK}.py",
                           root / f"{VALIDATION_NOTEBOOK}.ipynb", {"quick": quick})]
    if all(name in names_run for name in DISTILL_PAIRS):
        reads = tuple(t.name for name in DISTILL_READS for t in by_pair.get(name, []))
        tasks.append(schedule.Task(DISTILL_NOTEBOOK, notebooks_dir / f"{DISTILL_NOTEBOOK}.py",
                                   root / f"{DISTILL_NOTEBOOK}.ipynb",
                                   {"kl_params": str(names_run[DISTILL_PAIRS[0]].resolve()),
                                    "jacobian_params": str(names_run[DISTILL_PAIRS[1]].resolve()), "quick": quick},
                                   reads))
    everything = [t.name for pair in by_pair.values() for t in pair] + [t.name for t in tasks]
    tasks.append(schedule.Task(SUMMARY_NOTEBOOK, notebooks_dir / f"{SUMMARY_NOTEBOOK}.py",
                               root / f"{SUMMARY_NOTEBOOK}.ipynb", {"quick": quick}, tuple(everything)))
    return tasks


def _present(tasks: list[schedule.Task]) -> list[schedule.Task]:
    """The tasks whose notebook exists; one that waited on a missing task waits on what that one did."""
    resolved: dict[str, tuple[str, ...]] = {}
    out = []
    for task in tasks:
        after = tuple(dict.fromkeys(d for dep in task.after for d in resolved.get(dep, (dep,))))
        if task.notebook.exists():
            out.append(dataclasses.replace(task, after=after))
            resolved[task.name] = (task.name,)
        else:
            resolved[task.name] = after
    return out


def run_tasks(tasks: list[schedule.Task], jobs: int, cwd: Path) -> dict[str, float]:
    """Side by side in their own processes when jobs > 1; else one after another, output streamed here.

    Returns each task's wall seconds by name."""
    if jobs > 1:
        return schedule.run_tasks(tasks, jobs, cwd)
    schedule.check_order(tasks)
    return {task.name: _run_one(task.notebook, task.output, task.parameters, cwd) for task in tasks
            if task.notebook.exists()}


def _run_one(notebook: Path, output: Path, parameters: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    print(f"== {notebook.stem} {parameters.get('layer', '')} -> {output}", flush=True)
    execute(notebook, output, parameters, cwd)
    seconds = time.perf_counter() - t0
    print(f"   done in {seconds:.0f} s", flush=True)
    return seconds


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
        allocator.setting()  # a bad HIDDEN_SIGNATURES_MALLOC fails here, not when the first trainer starts
    except (params_mod.ParamsError, allocator.SettingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tasks = all_tasks(runs, args.notebooks_dir, args.quick, summary=not args.no_summary)
    try:
        seconds = run_tasks(tasks, args.jobs, cwd)
    except schedule.TaskFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"all done in {time.perf_counter() - t0:.0f} s on {args.jobs} job slot(s); "
          f"{schedule.job_minutes(tasks, seconds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
