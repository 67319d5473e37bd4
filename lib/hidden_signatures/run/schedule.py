"""Run independent notebooks side by side: a small dependency-aware pool of papermill processes.

After a pair's models, corpus and activations exist (written once, in order), its crosscoders
train and are analysed independently of each other. On a CPU, two single-threaded jobs get
more done than one job on two threads: the matrix products scale well across threads, but
kernel start-up, Python, figure export and the optimizer's memory-bound updates do not. Each
job runs in its own process with cores // jobs threads and writes its output to a log file
beside its executed notebook; the thread count is a function of the machine and `jobs` only,
so a run is as reproducible as a sequential one.

    python -m hidden_signatures.run.schedule NOTEBOOK OUTPUT PARAMETERS_JSON   (one job; used by run_tasks)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .notebooks import execute

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
POLL_SECONDS = 0.2
LOG_TAIL_LINES = 30


class TaskFailed(RuntimeError):
    """A notebook failed; the message names it and its log."""


@dataclass
class Task:
    """One notebook execution and the names of the tasks that must finish before it starts."""

    name: str
    """Unique, printed in progress lines, e.g. '03_train middle'."""
    notebook: Path
    output: Path
    parameters: dict
    after: tuple[str, ...] = field(default_factory=tuple)

    @property
    def log(self) -> Path:
        return self.output.with_suffix(".log")


def cpu_count() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_jobs() -> int:
    """Two jobs where there are at least two cores, else one."""
    return 2 if cpu_count() >= 2 else 1


def threads_per_job(jobs: int) -> int:
    return max(1, cpu_count() // jobs)


def check_order(tasks: list[Task]) -> None:
    """Every dependency names an earlier task (so the list order is a valid sequential order)."""
    seen: set[str] = set()
    for task in tasks:
        missing = [d for d in task.after if d not in seen]
        if missing or task.name in seen:
            raise ValueError(f"task {task.name!r}: " + (f"depends on {missing}, not earlier in the list"
                                                       if missing else "name repeats"))
        seen.add(task.name)


def run_tasks(tasks: list[Task], jobs: int, cwd: Path) -> dict[str, float]:
    """Run tasks, at most `jobs` at a time, each when its dependencies are done; list order is priority.

    Returns each task's wall seconds by name. On a failure no new task starts, the running ones
    are stopped, and TaskFailed names the notebook and its log (whose last lines are printed).
    """
    check_order(tasks)
    env = dict(os.environ, **dict.fromkeys(THREAD_VARS, str(threads_per_job(jobs))))
    pending, running, seconds = list(tasks), {}, {}  # seconds: the finished tasks
    t_run = time.perf_counter()
    try:
        while pending or running:
            for task in _ready(pending, seconds, jobs - len(running)):
                pending.remove(task)
                print(f"{_stamp(t_run)} == {task.name} -> {task.output} (log: {task.log})", flush=True)
                running[task.name] = (task, _start(task, env, cwd), time.perf_counter())
            time.sleep(POLL_SECONDS)
            for name, (task, proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode != 0:
                    raise TaskFailed(_failure(task, proc.returncode))
                seconds[name] = time.perf_counter() - t0
                print(f"{_stamp(t_run)}    done {name} in {seconds[name]:.0f} s", flush=True)
    finally:
        for _, proc, _ in running.values():
            _stop(proc)
    return seconds


def job_minutes(tasks: list[Task], seconds: dict[str, float]) -> str:
    """One line: the job-minutes each notebook took over the run, dearest first, and their total.

    This is where a run's wall time went (on `jobs` slots the wall time is about total / jobs).
    """
    by_notebook: dict[str, float] = {}
    for task in tasks:
        if task.name in seconds:
            by_notebook[task.notebook.stem] = by_notebook.get(task.notebook.stem, 0.0) + seconds[task.name] / 60
    parts = ", ".join(f"{stem} {minutes:.1f}" for stem, minutes in
                      sorted(by_notebook.items(), key=lambda kv: -kv[1]))
    return f"job-minutes by notebook: {parts}; total {sum(by_notebook.values()):.1f}"


def _stamp(t_run: float) -> str:
    """Minutes since the run's first job started, so a log shows when each job ran beside which."""
    return f"[{(time.perf_counter() - t_run) / 60:6.1f} min]"


def _ready(pending: list[Task], done: dict[str, float], free: int) -> list[Task]:
    """The first `free` pending tasks whose dependencies are all done."""
    return [t for t in pending if all(d in done for d in t.after)][:max(0, free)]


def _start(task: Task, env: dict, cwd: Path) -> subprocess.Popen:
    task.output.parent.mkdir(parents=True, exist_ok=True)
    with open(task.log, "w", encoding="utf-8") as log:
        return subprocess.Popen([sys.executable, "-m", __name__, str(task.notebook), str(task.output),
                                 json.dumps(task.parameters)], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a job and its kernel (they share a process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def _failure(task: Task, code: int) -> str:
    lines = task.log.read_text(encoding="utf-8", errors="replace").splitlines() if task.log.exists() else []
    tail = "\n".join(ln.rsplit("\r", 1)[-1] for ln in lines[-LOG_TAIL_LINES:])
    print(tail, file=sys.stderr, flush=True)
    return f"{task.name} failed (exit {code}); executed notebook: {task.output}; log: {task.log}"


def main(argv: list[str]) -> int:
    """Execute one notebook (the job run_tasks starts); exit 1 on a failed cell."""
    from papermill.exceptions import PapermillExecutionError

    notebook, output, parameters = argv
    try:
        execute(Path(notebook), Path(output), json.loads(parameters), Path.cwd())
    except PapermillExecutionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
