"""The side-by-side runner: dependency order, the job limit, threads per job, and failures."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from hidden_signatures.run import params, runner, schedule

NOTEBOOK = '''# %% tags=["parameters"]
name = "x"
record = ""
sleep = 0.0
fail = False

# %%
import json, os, time
t0 = time.time()
time.sleep(sleep)
if fail:
    raise RuntimeError(f"task {name} failed on purpose")
with open(record, "a") as fh:
    fh.write(json.dumps({"name": name, "start": t0, "end": time.time(),
                         "threads": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
'''


def task(tmp_path: Path, name: str, after: tuple[str, ...] = (), **params) -> schedule.Task:
    nb = tmp_path / "job.py"
    nb.write_text(NOTEBOOK, encoding="utf-8")
    return schedule.Task(name, nb, tmp_path / "out" / f"{name}.ipynb",
                         {"name": name, "record": str(tmp_path / "record.jsonl"), **params}, after)


def records(tmp_path: Path) -> dict[str, dict]:
    path = tmp_path / "record.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {r["name"]: r for r in map(json.loads, lines)}


def test_dependencies_wait_and_at_most_jobs_run_at_once(tmp_path, capsys) -> None:
    tasks = [task(tmp_path, "a", sleep=1.5), task(tmp_path, "b", sleep=1.5), task(tmp_path, "c", sleep=1.5),
             task(tmp_path, "d", after=("a", "b"))]
    seconds = schedule.run_tasks(tasks, jobs=2, cwd=tmp_path)
    rec = records(tmp_path)
    assert set(seconds) == {"a", "b", "c", "d"}
    assert all(seconds[n] >= rec[n]["end"] - rec[n]["start"] >= 1.5 for n in "abc")
    assert set(rec) == {"a", "b", "c", "d"}
    assert rec["d"]["start"] >= max(rec["a"]["end"], rec["b"]["end"])
    spans = sorted((r["start"], r["end"]) for r in rec.values())
    for t in (s for s, _ in spans):  # at every start, at most two tasks are inside their span
        assert sum(1 for s, e in spans if s <= t < e) <= 2
    assert {r["threads"] for r in rec.values()} == {str(schedule.threads_per_job(2))}
    assert all(t.log.exists() for t in tasks)
    lines = capsys.readouterr().out.splitlines()  # each start and end stamped with the run's minutes
    assert re.fullmatch(r"\[ +0\.0 min\] == a -> .*", lines[0])
    assert sum(bool(re.fullmatch(r"\[ +\d+\.\d min\]    done [a-d] in \d+ s", ln)) for ln in lines) == 4


def test_job_minutes_add_up_each_notebooks_tasks_dearest_first(tmp_path) -> None:
    def named(name: str, stem: str) -> schedule.Task:
        return schedule.Task(name, tmp_path / f"{stem}.py", tmp_path / f"{name}.ipynb", {})

    tasks = [named("p 00_models", "00_models"), named("p 03_train first", "03_train"),
             named("p 03_train last", "03_train"), named("q 03_train first", "03_train"), named("never", "99_summary")]
    seconds = {"p 00_models": 600.0, "p 03_train first": 300.0, "p 03_train last": 420.0, "q 03_train first": 6.0}
    assert schedule.job_minutes(tasks, seconds) == ("job-minutes by notebook: 03_train 12.1, 00_models 10.0; "
                                                    "total 22.1")


def test_a_failure_names_the_notebook_and_log_and_stops_the_rest(tmp_path, capsys) -> None:
    tasks = [task(tmp_path, "bad", fail=True), task(tmp_path, "later", after=("bad",))]
    with pytest.raises(schedule.TaskFailed, match=r"bad failed .*log: .*bad\.log"):
        schedule.run_tasks(tasks, jobs=2, cwd=tmp_path)
    assert "failed on purpose" in capsys.readouterr().err
    assert "later" not in records(tmp_path)


def test_a_failure_stops_the_running_side_job(tmp_path) -> None:
    tasks = [task(tmp_path, "slow", sleep=60), task(tmp_path, "bad", fail=True)]
    t0 = time.perf_counter()
    with pytest.raises(schedule.TaskFailed):
        schedule.run_tasks(tasks, jobs=2, cwd=tmp_path)
    assert time.perf_counter() - t0 < 45
    assert "slow" not in records(tmp_path)


def test_dependencies_must_name_earlier_tasks(tmp_path) -> None:
    with pytest.raises(ValueError, match="'a': depends on \\['b'\\]"):
        schedule.check_order([task(tmp_path, "a", after=("b",)), task(tmp_path, "b")])
    with pytest.raises(ValueError, match="name repeats"):
        schedule.check_order([task(tmp_path, "a"), task(tmp_path, "a")])


def test_point_tasks_train_everything_first_and_analyse_a_layer_after_all_its_crosscoders(bf16_machine) -> None:
    run = params.load(ROOT / "params" / "smollm2-finetuned.yaml")
    layers = {label: None for label in params.labels_of(run.layers)}
    tasks = runner.point_tasks(run, layers, ROOT / "notebooks", {"params_file": "x", "quick": False})
    names = [t.name.removeprefix("smollm2-finetuned ") for t in tasks]
    trains = [n for n in names if n.startswith("03_train")]
    assert names[:len(trains)] == trains and len(trains) == 7
    by_name = {t.name.removeprefix("smollm2-finetuned "): t for t in tasks}
    middle = {f"smollm2-finetuned {n}" for n in trains if n.split()[1].startswith("middle")}
    assert set(by_name["04_analysis middle"].after) == middle
    assert set(by_name["04_analysis middle-seed1"].after) == middle
    assert by_name["05_strengths middle-dfc"].after == ("smollm2-finetuned 04_analysis middle-dfc",)
    assert "05_strengths middle-seed1" not in by_name  # seed repeats add headline metrics only
    schedule.check_order(tasks)


def default_graph() -> list[schedule.Task]:
    paths = [ROOT / "params" / f"{n}.yaml" for n in runner.default_pairs(ROOT / "params")]
    runs = [(p, run, dict.fromkeys(params.labels_of(run.layers))) for p in paths for run in [params.load(p)]]
    return runner.all_tasks(runs, ROOT / "notebooks", quick=False)


def test_all_tasks_let_the_next_pairs_set_up_overlap_this_pairs_training(bf16_machine) -> None:
    tasks = default_graph()
    schedule.check_order(tasks)
    by_name = {t.name: t for t in tasks}
    # 00_models lead the priority list, the dearest made model (the Jacobian student) first once the
    # shared base model is converted; each waits only for the pairs that first name its models
    assert [t.name for t in tasks[:4]] == ["smollm2-same 00_models", "distill-jacobian 00_models",
                                           "distill-kl 00_models", "smollm2-finetuned 00_models"]
    assert by_name["smollm2-gemma3 00_models"].after == ("smollm2-same 00_models",)
    assert by_name["distill-jacobian 00_models"].after == ("smollm2-same 00_models",)
    assert set(by_name["distill-kl-vs-jacobian 00_models"].after) == {"distill-kl 00_models",
                                                                       "distill-jacobian 00_models"}
    n_pairs = len(runner.default_pairs(ROOT / "params"))
    assert {t.notebook.stem for t in tasks[:n_pairs]} == {"00_models"}
    assert by_name["smollm2-gemma3 02_activations"].after == ("smollm2-gemma3 01_data",)
    assert by_name["smollm2-same 03_train last"].after == ("smollm2-same 02_activations",)
    first_train = next(i for i, t in enumerate(tasks) if t.notebook.stem == "03_train")
    assert {t.notebook.stem for t in tasks[:first_train]} == set(runner.PAIR_NOTEBOOKS)
    # longest training first within a pair: the sanity pair's 1M-token crosscoders before its 0.3M ones
    sanity = [t.parameters["layer"] for t in tasks if t.name.startswith("smollm2-same 03_train")]
    assert sanity == ["middle", "last", "first", "first-seed1", "first-seed2"]


def test_all_tasks_summary_notebooks_wait_for_what_they_read(bf16_machine) -> None:
    tasks = default_graph()
    by_name = {t.name: t for t in tasks}
    assert by_name[runner.VALIDATION_NOTEBOOK].after == ()  # planted ground truth: reads no pair
    distill_after = set(by_name[runner.DISTILL_NOTEBOOK].after)
    assert "distill-kl-vs-jacobian 05_strengths last" in distill_after
    assert "distill-jacobian 04_analysis middle-seed2" in distill_after
    assert not any(n.startswith("smollm2-gemma3 ") for n in distill_after)
    assert set(by_name[runner.SUMMARY_NOTEBOOK].after) == set(by_name) - {runner.SUMMARY_NOTEBOOK}
    assert tasks[-1].name == runner.SUMMARY_NOTEBOOK


def test_an_fp32_machine_trains_two_seeds_where_bf16_trains_three(fp32_machine) -> None:
    by_name = {t.name: t for t in default_graph()}
    assert "distill-jacobian 03_train middle-seed1" in by_name
    assert not any("seed2" in n for n in by_name)
    assert "distill-jacobian 04_analysis middle-seed1" in by_name[runner.DISTILL_NOTEBOOK].after


def test_a_bf16_cpu_without_amx_trains_two_seeds_and_keeps_the_bf16_budgets(bf16_without_amx_machine) -> None:
    by_name = {t.name: t for t in default_graph()}
    assert "smollm2-same 03_train first-seed1" in by_name and "distill-jacobian 03_train middle-seed1" in by_name
    assert not any("seed2" in n for n in by_name)
    run = params.load(ROOT / "params" / "smollm2-same.yaml")
    assert run.train.tokens == 2_400_000 and run.harvest.max_tokens is None and run.analysis.splice_seqs == 4


def test_missing_notebooks_drop_out_and_their_dependants_wait_on_what_they_waited_for(tmp_path) -> None:
    a, b, c = task(tmp_path, "a"), task(tmp_path, "b", after=("a",)), task(tmp_path, "c", after=("b",))
    b.notebook = tmp_path / "missing.py"
    kept = runner._present([a, b, c])
    assert [(t.name, t.after) for t in kept] == [("a", ()), ("c", ("a",))]


def test_runner_rejects_a_bad_jobs_value(capsys) -> None:
    assert runner.main(["smollm2-same", "--jobs", "0", "--params-dir", str(ROOT / "params")]) == 2
    assert "--jobs 0" in capsys.readouterr().err
