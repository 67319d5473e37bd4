"""Smoke test of benchmarks/run.py on a tiny random model: every result is written and positive.

No timing assertions: tiny sizes say nothing about speed (the real numbers come from
`bash run_all.sh bench`). The variant losses are checked against the library's loss. Both
precisions the run can pick are covered by forcing `dtype: auto` (HIDDEN_SIGNATURES_PRECISION),
so the checks do not depend on this machine's CPU.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import fields

import pytest
import torch

from conftest import ROOT, save_tiny_model

if str(ROOT) not in sys.path:  # benchmarks/ sits beside lib/, at the project root
    sys.path.insert(0, str(ROOT))

from benchmarks import run as bench  # noqa: E402
from benchmarks import steps  # noqa: E402
from benchmarks import timing  # noqa: E402
from hidden_signatures import allocator, io, precision  # noqa: E402
from hidden_signatures.harvest import activations  # noqa: E402
from hidden_signatures.crosscoders import crosscoder as cc_mod  # noqa: E402

ENTRY_KEYS = {"name", "ours_s", "baseline_s", "ratio", "ratio_of_mins", "repeats", "target", "met"}
N_ENTRIES = 2 + 2 + 8 + 5 + 1 + 2 + 3 + 1
"""matmul (2 shapes), harvest, training step (4 + 4 variants), sparse step (2 bounds + 2 L0s + BatchTopK), threads, students,
end to end, growth"""
SUMMARY_KEYS = {"device", "capability", "bf16_native", "dtype", "reason", "bf16_speedup"}


def tiny_bench(model_dir) -> bench.BenchConfig:
    """Every size tiny: the whole run takes seconds."""
    return bench.BenchConfig(model=str(model_dir), harvest_seqs=3, seq_len=12, repeats=1, harvest_repeats=1,
                             d_a=16, d_b=24,
                             dict_size=64, batch_size=32, trained_l0=8, compile=False, e2e_tokens=120,
                             e2e_steps=3, e2e_batch=16, e2e_dict=32, growth_steps=(2, 4),
                             store_rows=(200, 600), memory_steps=2, run_matmul=(16, 16, 48),
                             matmul_call_s=0.01, threshold_l0s=(4, 16), distill_seqs=2, distill_len=8,
                             distill_params="")  # the default run's 15-block start needs 30 blocks


STUDENT_BLOCKS = [0, 1, 2, 3, 4, 5] + list(range(21, 30))


@pytest.mark.parametrize("machine", ["bf16_machine", "bf16_without_amx_machine", "fp32_machine"])
def test_students_are_benchmarked_as_the_default_run_trains_them(request, machine):
    """The student rows time the default run's students: its start blocks and its Jacobian term (one
    direction on one of 8 sequences), as params/distill-kl-vs-jacobian.yaml sets them on every class."""
    request.getfixturevalue(machine)
    run_cfg = steps.run_distill_config(bench.BenchConfig(), "float32")
    run = steps.params.load(ROOT / "params" / "distill-kl-vs-jacobian.yaml")
    shipped = steps.derived.train_config(run, "distill-kl")
    assert shipped.steps == 60 and shipped.student_blocks == run_cfg.student_blocks == STUDENT_BLOCKS
    assert (run_cfg.n_dirs, run_cfg.jac_max_seqs) == (shipped.n_dirs, shipped.jac_max_seqs) == (1, 1)
    assert (run_cfg.steps, run_cfg.warmup_steps, run_cfg.autocast_dtype) == (1, 0, "float32")
    assert (run_cfg.temperature, run_cfg.alpha, run_cfg.jac_weight) == (shipped.temperature, shipped.alpha,
                                                                         shipped.jac_weight)
    default = steps.run_distill_config(bench.BenchConfig(distill_params=""), "bfloat16")
    assert (default.n_dirs, default.jac_max_seqs, default.student_blocks) == (2, 0, None)


def names(results: dict, prefix: str) -> list[str]:
    return [e["name"] for e in results["ratios"] if e["name"].startswith(prefix)]


def test_met_is_judged_on_the_ratio_as_written():
    """A ratio of 0.99998 is written as 1.0: against a target of 1.0 the row must say met, and it must
    be written that way (CI once saw `met: false` beside `ratio: 1.0`)."""
    entry = timing.ratio_entry("tie", [1.00002], [1.0], 1.0)
    assert entry["ratio"] == 1.0 and entry["met"] is True
    assert io._clean(entry, timing.DIGITS)["ratio"] == entry["ratio"]
    below = timing.ratio_entry("below", [1.001], [1.0], 1.0)
    assert below["ratio"] == 0.999 and below["met"] is False


@pytest.mark.parametrize("chosen", ["bfloat16", "float32"])
def test_run_writes_every_entry(tmp_path, tiny_tokenizer, monkeypatch, chosen):
    monkeypatch.setenv("HIDDEN_SIGNATURES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(precision.FORCE_ENV, chosen)  # what auto picks here, on any CPU
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer=tiny_tokenizer)
    out = tmp_path / "out"
    bench.run(tiny_bench(model_dir), out, parts=tuple(p for p in bench.PARTS if p != "allocator"))  # own test below

    results = io.read_json(out / bench.RESULTS_JSON)
    gain_bound_rows = chosen == "bfloat16"  # the step's bare matmuls, bf16 vs fp32, where bf16 is chosen
    assert len(results["ratios"]) == N_ENTRIES + gain_bound_rows, [e["name"] for e in results["ratios"]]
    assert results["skipped"] == []  # tiny bf16 calls are always affordable
    for entry in results["ratios"]:
        assert set(entry) == ENTRY_KEYS, entry
        assert entry["ours_s"] > 0 and entry["baseline_s"] > 0 and entry["target"] > 0, entry
        assert entry["ratio_of_mins"] > 0 and entry["repeats"] >= 1, entry
        assert entry["ratio"] == pytest.approx(entry["baseline_s"] / entry["ours_s"], rel=2e-3)
        assert entry["met"] == (entry["ratio"] >= entry["target"])
    assert [r["steps"] for r in results["growth"]["per_step"]] == [2, 4]
    assert all(r["seconds"] > 0 and r["s_per_step"] > 0 for r in results["growth"]["per_step"])
    memory = results["growth"]["memory"]
    assert memory[0]["store_rows"] < memory[1]["store_rows"]
    assert all(m["peak_rss_mib"] >= m["peak_anon_mib"] > 0 for m in memory)
    assert results["checks"]["harvest_ours_equals_limit"] is True  # both sides read the same tensor
    machine = results["machine"]
    assert machine["cpu_count"] > 0 and machine["torch"] == torch.__version__ and machine["cpu"]
    assert machine["torch_threads"] == torch.get_num_threads() > 0
    assert len(machine["load_average"]) == 3 and len(machine["load_average_end"]) == 3

    # the precision the run used: recorded, and every "ours" and every bound ran in it
    short = bench.SHORT[chosen]
    assert set(machine["precision"]) == SUMMARY_KEYS
    assert machine["precision"]["dtype"] == chosen and precision.FORCE_ENV in machine["precision"]["reason"]
    assert machine["precision"]["capability"].startswith(machine["cpu_capability"])
    assert results["checks"]["harvest_dtype"] == chosen
    assert results["checks"]["step_precision"] == bench.SHORT[chosen]
    assert results["checks"]["step_ours_autocast"] is False  # ours is the fused step: it casts, no autocast
    assert results["checks"]["step_bound_dtype"] == chosen
    assert results["checks"]["trained_step_sparse"] is False  # L0 8 of 64 (0.125) is above sparse_below: dense
    assert results["checks"]["sparse_below_auto"] == results["checks"]["sparse_below_auto_run_shape"] == 0.05  # pinned

    # the new row: bf16 vs fp32 matmul at the default run's shape and at the paper-sized step's
    matmul = names(results, "matmul ")
    assert matmul == [f"matmul 16x16 @ 16x48 (the default run's encoder): {short} (chosen) vs "
                      f"{'fp32' if chosen == 'bfloat16' else 'bf16'}",
                      f"matmul 32x16 @ 16x64 (the paper-sized step's encoder): {short} (chosen) vs "
                      f"{'fp32' if chosen == 'bfloat16' else 'bf16'}"]
    records = results["precision"]["matmul"]
    assert [r["shape"] for r in records] == [[16, 16, 48], [32, 16, 64]]
    for r, entry in zip(records, (e for e in results["ratios"] if e["name"] in matmul)):
        assert r["fp32_s"] > 0 and r["bf16_s"] > 0 and r["products_per_call"] >= 1
        assert r["bf16_speedup"] == pytest.approx(r["fp32_s"] / r["bf16_s"], rel=2e-3)
        expected = r["bf16_speedup"] if chosen == "bfloat16" else 1 / r["bf16_speedup"]
        assert entry["ratio"] == pytest.approx(expected, rel=5e-3) and entry["target"] == 1.0

    harvest = {e["name"]: e for e in results["ratios"] if e["name"].startswith("harvest")}
    limit = next(e for name, e in harvest.items() if "limit" in name)
    assert f"ours ({short}) vs limit (plain {short} forward stopped at the block)" in limit["name"]
    assert limit["target"] == (0.95 if chosen == "bfloat16" else 0.9)
    assert any(f"ours ({short}, dtype auto) vs original (fp32" in name for name in harvest)
    step = names(results, "training step (dA 16, dB 24")
    assert len(step) == 2 and "bf16 vs fp32" in step[0]
    assert step[1].endswith(f"ours ({short}) vs the bare {short} matmuls of the same step")
    gain_bound = names(results, "bare matmuls of the training step (dA 16, dB 24")  # bf16 chosen only
    assert len(gain_bound) == (chosen == "bfloat16") and all(n.endswith("bf16 vs fp32 (what bounds the step's "
                                                                          "bf16 gain)") for n in gain_bound)
    assert len(names(results, "training step at trained L0")) == 2
    assert len(names(results, "training step variant: ")) == 4
    default_shape = names(results, "training step (dA 16, dB 16, H 48, batch 16")
    assert len(default_shape) == 5 and "ours dense" in default_shape[0] and "sparse vs dense" in default_shape[3]
    assert "bare matmuls plus the fused Adam update" in default_shape[1]
    checks = results["checks"]
    assert checks["run_shape_params"] == 2 * 48 * (16 + 16) + 48 + 16 + 16  # W_enc, W_dec, b_enc, b_dec
    assert checks["run_shape_adam_s"] > 0 and checks["run_shape_bound_s"] > 0 and checks["run_shape_dense_s"] > 0
    assert default_shape[4].endswith(f"{torch.get_num_threads()} threads vs 1 (ideal {torch.get_num_threads()}x)")
    density = results["checks"]["sparse_crossover_density"]
    assert density is None or 0 < density <= 1
    assert len(names(results, "student step (2 x 8 tokens")) == 2
    assert len(names(results, "BatchTopK training step (dA 16, dB 16, H 48, batch 16, k")) == 1
    assert names(results, "end to end (")[0].endswith(f"ours ({short}) vs original (fp32)")
    assert results["checks"]["e2e_sparse_probe_s"] >= 0  # resolved (sparse_below pinned here) before the timing

    table = (out / bench.RESULTS_MD).read_text()
    assert all(entry["name"] in table for entry in results["ratios"])
    assert "End to end: the sparse step's crossover" in table
    first = table.splitlines()[0]
    assert first.startswith("Machine: ") and f"precision auto -> {chosen}" in first
    assert machine["cpu"] in first and f"torch {torch.__version__}" in first and "Load average at start" in first


@pytest.mark.skipif(not allocator.available(), reason="the allocator setting is glibc's")
def test_allocator_rows_compare_child_processes_in_each_setting(tmp_path, tiny_tokenizer, monkeypatch):
    """Two rows (crosscoder step, KL student step), each side from its own processes, which report the
    setting they ran in (the bench fails if a side's setting did not take), faults and peak RSS."""
    monkeypatch.setenv("HIDDEN_SIGNATURES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(precision.FORCE_ENV, "float32")
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer=tiny_tokenizer)
    bench.run(dataclasses.replace(tiny_bench(model_dir), allocator_rounds=1), tmp_path / "out", parts=("allocator",))
    results = io.read_json(tmp_path / "out" / bench.RESULTS_JSON)
    rows = [e["name"] for e in results["ratios"]]
    assert len(rows) == 2 and rows[0].startswith("crosscoder step (dA 16, dB 16, H 48, batch 16), fp32: freed memory")
    assert rows[1].startswith("KL student step (2 x 8 tokens), fp32: freed memory retained")
    for row in results["ratios"]:
        assert row["repeats"] == 1 and row["target"] == 1.05
    for sides in (v for k, v in results["checks"].items() if k.startswith("allocator, ")):
        assert set(sides) == {"retained", "glibc default"}
        assert all(side["peak_rss_mib"] > 0 and side["page_faults_per_step"] >= 0 for side in sides.values())


def test_emulated_bf16_over_budget_is_recorded_not_timed(tmp_path, monkeypatch):
    """fp32 chosen (bf16 emulated) and a budget nothing fits: the bf16-only measurements are listed, not run."""
    monkeypatch.setenv("HIDDEN_SIGNATURES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(precision.FORCE_ENV, "float32")
    cfg = bench.BenchConfig(repeats=1, d_a=16, d_b=24, dict_size=64, batch_size=32, trained_l0=8, compile=False,
                            run_matmul=(16, 16, 48), matmul_call_s=0.01, bf16_budget_s=1e-12, threshold_l0s=(4,))
    results = bench.run(cfg, tmp_path, stem="emulated", parts=("matmul", "training step"))
    assert (tmp_path / "emulated.json").exists() and (tmp_path / "emulated.md").exists()
    skipped = [s["name"] for s in results["skipped"]]
    assert len(skipped) == 3, skipped
    assert skipped[0].startswith("matmul 32x16 @ 16x64") and "ours in bf16" in skipped[1]
    assert steps.BF16_WEIGHTS in skipped[2]
    assert all(s["estimated_s"] > s["budget_s"] for s in results["skipped"])
    got = [e["name"] for e in results["ratios"]]
    assert len(got) == 1 + 6 and got[0].startswith("matmul 16x16 @ 16x48")  # the default run's shape is always timed
    assert not any("bf16 vs fp32" in n or steps.BF16_WEIGHTS in n for n in got)
    table = (tmp_path / "emulated.md").read_text()
    assert table.count("| not timed |") == 3 and "Not timed: " in table

    monkeypatch.setenv(precision.FORCE_ENV, "bfloat16")  # bf16 chosen: it is what we run, never skipped
    results = bench.run(cfg, tmp_path, stem="native", parts=("matmul",))
    assert results["skipped"] == [] and len(results["ratios"]) == 2


def test_unknown_part_is_refused(tmp_path):
    with pytest.raises(ValueError, match="accepted: matmul"):
        bench.run(bench.BenchConfig(), tmp_path, parts=("matmuls",))


@pytest.mark.parametrize("loss_fn", [steps.fused_l1_loss, steps.sparse_decoder_loss])
def test_variant_losses_match_library_loss(loss_fn):
    cfg = cc_mod.CrosscoderConfig(d_a=12, d_b=20, dict_size=48)
    gen = torch.Generator().manual_seed(1)
    x_NA, x_NB = torch.randn(40, 12, generator=gen), torch.randn(40, 20, generator=gen)
    ref, cand = cc_mod.build(cfg, seed=3), cc_mod.build(cfg, seed=3)
    for model in (ref, cand):
        l0 = steps.set_l0(model, x_NA, x_NB, 6)
        assert 1 < l0 < 20
    steps.loss_ours(ref, x_NA, x_NB, 2.0).backward()
    total = loss_fn(cand, x_NA, x_NB, 2.0)
    total.backward()
    assert total.item() == pytest.approx(ref.loss(x_NA, x_NB, 2.0).total.item(), rel=1e-5)
    for name in cc_mod.PARAM_NAMES:
        torch.testing.assert_close(getattr(cand, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-5)


def test_make_store_is_a_valid_store(tmp_path):
    store = bench.make_store(tmp_path / "s", n_rows=50, d_model=8, seq_len=6, seed=0)
    assert activations.verify_store(store.directory) is not None
    assert store.n_tokens == 50 and store.layers == [bench.STORE_LAYER]
    pair = activations.PairedActivations(store, store, bench.STORE_LAYER, bench.STORE_LAYER)
    x_a, _ = pair.train_batch(torch.arange(4).numpy())
    assert x_a.norm(dim=1).mean().item() == pytest.approx(8 ** 0.5, rel=0.3)


def test_config_validation_and_quick():
    with pytest.raises(ValueError, match="growth_steps"):
        bench.BenchConfig(growth_steps=(5,))
    with pytest.raises(ValueError, match="store_rows"):
        bench.BenchConfig(store_rows=(10, 5))
    with pytest.raises(ValueError, match="dict_size"):
        bench.BenchConfig(dict_size=0)
    with pytest.raises(ValueError, match="run_matmul"):
        bench.BenchConfig(run_matmul=(512, 576))
    with pytest.raises(ValueError, match="threshold_l0s"):
        bench.BenchConfig(threshold_l0s=(32, 4096))
    with pytest.raises(ValueError, match="bf16_budget_s"):
        bench.BenchConfig(bf16_budget_s=0)
    with pytest.raises(ValueError, match="matmul_call_s"):
        bench.BenchConfig(matmul_call_s=-1.0)
    full, quick = bench.BenchConfig(), bench.BenchConfig().quick()
    for f in fields(full):
        if isinstance(getattr(full, f.name), int) and not isinstance(getattr(full, f.name), bool):
            assert getattr(quick, f.name) <= getattr(full, f.name), f.name


def test_crossover_interpolates_where_sparse_stops_paying():
    assert steps.crossover({0.01: 2.0, 0.04: 1.0 / 2.0}) == pytest.approx(0.02)  # log-linear midpoint
    assert steps.crossover({0.01: 3.0, 0.1: 1.5}) is None  # sparse pays over the whole measured range
    assert steps.crossover({0.01: 0.9, 0.1: 0.5}) == 0.01  # never pays: the smallest density measured
