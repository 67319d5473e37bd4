"""dtype: auto picks bf16 only where the hardware computes it natively; explicit settings win (issue 17).

Each path is forced by monkeypatching what torch reports about the CPU and the micro-benchmark,
so both the AMX and the AVX2-only decisions are tested on whatever machine runs the suite.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import SPARSE_PIN
from hidden_signatures import precision
from hidden_signatures.models import lm_training
from hidden_signatures.run import derived, params, pipeline

DATA = SimpleNamespace(d_a=16, d_b=24)
"""Stands for the paired activations: the widths the sparse threshold would be probed at."""
AMX = {"capability": "AVX512", "amx": True, "avx512_bf16": True}
AVX2 = {"capability": "AVX2", "amx": False, "avx512_bf16": False}
ZEN4 = {"capability": "AVX512", "amx": False, "avx512_bf16": True}
"""AVX512-BF16 without AMX tiles (e.g. AMD Zen 4): bf16 native, about 2x fp32."""
AVX512_NO_BF16 = {"capability": "AVX512", "amx": False, "avx512_bf16": False}


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Each test detects afresh, with its own cache and no forcing variable."""
    monkeypatch.setenv("HIDDEN_SIGNATURES_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.delenv(precision.AMX_ENV, raising=False)
    precision._detect_cpu.cache_clear()
    yield
    precision._detect_cpu.cache_clear()


def machine(monkeypatch, feats: dict, fp32_s: float = 4e-3, bf16_s: float = 1e-3) -> list[str]:
    """Pretend to be a CPU with `feats` whose matmuls take these times; returns the dtypes benchmarked."""
    timed: list[str] = []

    def fake_time(dtype, *args, **kwargs):
        timed.append(dtype)
        return {"float32": fp32_s, "bfloat16": bf16_s}[dtype]

    monkeypatch.setattr(precision, "cpu_features", lambda: dict(feats))
    monkeypatch.setattr(precision, "matmul_time", fake_time)
    return timed


def test_amx_cpu_chooses_bf16(monkeypatch) -> None:
    machine(monkeypatch, AMX)
    choice = precision.detect("cpu")
    assert choice.dtype == "bfloat16" and choice.bf16_native and choice.bf16_speedup == 4.0
    assert precision.resolve("auto", "cpu") == "bfloat16"
    assert "AMX" in choice.capability and "4.0x faster" in choice.line()


def test_avx2_cpu_chooses_fp32_without_benchmarking(monkeypatch) -> None:
    timed = machine(monkeypatch, AVX2)
    choice = precision.detect("cpu")
    assert choice.dtype == "float32" and not choice.bf16_native and timed == []
    assert "no AMX or AVX512-BF16" in choice.reason
    assert precision.resolve("auto", "cpu") == "float32"


def test_capped_dispatch_chooses_fp32(monkeypatch) -> None:
    """AMX hardware, but torch told to dispatch AVX2 kernels (ATEN_CPU_CAPABILITY=avx2): bf16 is emulated."""
    machine(monkeypatch, {**AMX, "capability": "AVX2"})
    assert precision.detect("cpu").dtype == "float32"


def test_avx512_without_bf16_chooses_fp32(monkeypatch) -> None:
    machine(monkeypatch, AVX512_NO_BF16)
    assert precision.detect("cpu").dtype == "float32"


def test_bf16_feature_but_slow_matmul_chooses_fp32(monkeypatch) -> None:
    machine(monkeypatch, AMX, fp32_s=1e-3, bf16_s=1e-3)
    choice = precision.detect("cpu")
    assert choice.dtype == "float32" and choice.bf16_native and "< 1.3x" in choice.reason


def test_benchmark_is_measured_once_per_machine(monkeypatch) -> None:
    timed = machine(monkeypatch, AMX)
    assert precision.bf16_speedup(AMX) == 4.0 and precision.bf16_speedup(AMX) == 4.0
    assert timed == ["float32", "bfloat16"]  # the second call read the cached file


def test_explicit_settings_win_over_auto(monkeypatch) -> None:
    machine(monkeypatch, AMX)
    assert precision.resolve("float32", "cpu") == "float32"
    machine(monkeypatch, AVX2)
    precision._detect_cpu.cache_clear()
    assert precision.resolve("bfloat16", "cpu") == "bfloat16"


def test_force_variable(monkeypatch) -> None:
    machine(monkeypatch, AMX)
    monkeypatch.setenv(precision.FORCE_ENV, "float32")
    assert precision.detect("cpu").dtype == "float32" and "forced" in precision.detect("cpu").reason
    monkeypatch.setenv(precision.FORCE_ENV, "fp8")
    with pytest.raises(precision.PrecisionError, match="HIDDEN_SIGNATURES_PRECISION: 'fp8' is not accepted"):
        precision.detect("cpu")


def test_bad_setting_is_one_line() -> None:
    with pytest.raises(precision.PrecisionError, match="dtype: 'half' is not accepted; accepted: auto, bfloat16"):
        precision.resolve("half", "cpu")


def test_real_detection_on_this_machine() -> None:
    choice = precision.detect("cpu")
    assert choice.dtype in precision.DTYPES and choice.capability
    if not choice.bf16_native:
        assert choice.dtype == "float32"
    assert set(choice.record()) == {"device", "capability", "bf16_native"}


def test_matmul_time_measures() -> None:
    seconds = precision.matmul_time("float32", shape=(64, 64, 64), repeats=3)
    assert 0 < seconds < float("inf")  # no bound on the time itself: a loaded machine may take any


# -- the pipeline and the made models follow the choice ------------------------------------------------

def tiny_params(**sections) -> params.RunConfig:
    return params.from_dict({"name": "p", "model_a": "smollm2-135m", "model_b": "smollm2-135m",
                             "layers": ["first"], "device": "cpu", **sections})


@pytest.mark.parametrize("feats, expected", [(AMX, "bfloat16"), (AVX2, "float32")])
def test_pipeline_resolves_auto(monkeypatch, feats, expected) -> None:
    machine(monkeypatch, feats)
    run = tiny_params()
    assert run.harvest.dtype == "auto" and run.train.dtype == "auto"
    assert pipeline.harvest_dtype(run) == expected
    pt = pipeline.point(run, "first")
    assert pipeline.resolved_train(run, pt, DATA).dtype == expected
    record = pipeline.precision_record(run, pt, DATA)
    assert record["train"] == expected and record["train_sparse_below"] == float(SPARSE_PIN)


@pytest.mark.parametrize("feats", [AMX, AVX2])
def test_pipeline_keeps_explicit_params(monkeypatch, feats) -> None:
    machine(monkeypatch, feats)
    run = tiny_params(harvest={"dtype": "float32"}, train={"dtype": "bfloat16"})
    assert pipeline.harvest_dtype(run) == "float32"
    assert pipeline.resolved_train(run, pipeline.point(run, "first"), DATA).dtype == "bfloat16"


@pytest.mark.parametrize("feats, expected", [(AMX, torch.bfloat16), (AVX2, None)])
def test_lm_training_autocast_follows_auto(monkeypatch, feats, expected) -> None:
    machine(monkeypatch, feats)
    assert lm_training.autocast_dtype("auto", torch.device("cpu")) == expected
    assert lm_training.autocast_dtype("float32", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="autocast_dtype='fp8'"):
        lm_training.autocast_dtype("fp8", torch.device("cpu"))


@pytest.mark.parametrize("feats, expected", [(AMX, "bfloat16"), (AVX2, "float32")])
def test_made_model_settings_name_the_resolved_precision(monkeypatch, feats, expected) -> None:
    """The made model's cache key hashes its settings: auto is resolved first, so fp32 and bf16 builds differ."""
    machine(monkeypatch, feats)
    run = tiny_params(finetune={"steps": 3, "warmup_steps": 1})
    assert derived.train_config(run, "finetune").autocast_dtype == expected
    explicit = dataclasses.replace(run, finetune={"steps": 3, "warmup_steps": 1, "autocast_dtype": "float32"})
    assert derived.train_config(explicit, "finetune").autocast_dtype == "float32"


def test_training_key_changes_with_the_resolved_precision(monkeypatch) -> None:
    """A crosscoder trained in bf16 is not reused where auto now means fp32 (and the other way round)."""
    run = tiny_params()
    pt = pipeline.point(run, "first")
    resolved = []
    for feats in (AMX, AVX2):
        machine(monkeypatch, feats)
        precision._detect_cpu.cache_clear()
        resolved.append(pipeline.resolved_train(run, pt, DATA))
    assert resolved[0].dtype == "bfloat16" and resolved[1].dtype == "float32"


def test_resolved_train_carries_the_sparse_threshold(monkeypatch) -> None:
    """sparse_below: auto is resolved into the settings the training key hashes (a crosscoder trained on
    the other path is not reused); variants, which never take the fused step, keep it as given."""
    run = tiny_params()
    pt = pipeline.point(run, "first")
    for pin in ("0.05", "0"):
        monkeypatch.setenv("HIDDEN_SIGNATURES_SPARSE_BELOW", pin)
        assert pipeline.resolved_train(run, pt, DATA).sparse_below == float(pin)
    variant = tiny_params(crosscoder={"architecture": "batchtopk"})
    assert pipeline.resolved_train(variant, pipeline.point(variant, "first"), DATA).sparse_below == "auto"


def test_start_line_is_printed() -> None:
    out = subprocess.run([sys.executable, "-m", "hidden_signatures.precision"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.startswith("device cpu, capability ") and ": precision " in out and "\n" not in out


# -- budgets per machine class ----------------------------------------------------------------------

FP32_PARAMS = {"name": "p", "model_a": "smollm2-135m", "model_b": "smollm2-135m", "layers": ["first"],
               "device": "cpu", "train": {"tokens": 100_000, "batch_size": 512},
               "quick": {"train": {"tokens": 30_000}},
               "fp32_cpu": {"train": {"tokens": 40_000}, "quick": {"train": {"tokens": 10_000}}}}


CLASS_PARAMS = {**FP32_PARAMS, "seed_floor": {"seeds": 3, "at": ["first"]},
                "bf16_without_amx": {"seed_floor": {"seeds": 2}, "analysis": {"splice_seqs": 4}}}


@pytest.mark.parametrize("feats, tokens, quick_tokens", [(AMX, 100_000, 30_000), (AVX2, 40_000, 10_000)])
def test_fp32_cpu_budgets_apply_only_without_native_bf16(monkeypatch, feats, tokens, quick_tokens) -> None:
    machine(monkeypatch, feats)
    assert params.from_dict(FP32_PARAMS).train.tokens == tokens
    assert params.from_dict(FP32_PARAMS, quick=True).train.tokens == quick_tokens


def test_fp32_cpu_budgets_do_not_apply_on_cuda(monkeypatch) -> None:
    machine(monkeypatch, AVX2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine with a slow-bf16 CPU
    auto = params.build(params.RunConfig, {**FP32_PARAMS, "device": "auto"})
    assert not params.fp32_cpu_applies(auto)
    assert params.fp32_cpu_applies(params.build(params.RunConfig, FP32_PARAMS))  # device: cpu


@pytest.mark.parametrize("feats, seeds, splice, tokens", [(AMX, 3, 8, 100_000), (ZEN4, 2, 4, 100_000),
                                                          (AVX2, 3, 8, 40_000)])
def test_each_cpu_class_takes_its_own_section_and_no_other(monkeypatch, feats, seeds, splice, tokens) -> None:
    machine(monkeypatch, feats, fp32_s=2e-3)  # bf16 2x fp32 on both bf16 CPUs: AMX tiles, not speed, decide
    run = params.from_dict(CLASS_PARAMS)
    assert (run.seed_floor.seeds, run.analysis.splice_seqs, run.train.tokens) == (seeds, splice, tokens)
    assert params.from_dict(CLASS_PARAMS, quick=True).train.tokens == (10_000 if feats is AVX2 else 30_000)


def test_amx_can_be_pinned_by_environment_and_a_bad_value_is_named(monkeypatch) -> None:
    machine(monkeypatch, ZEN4)
    monkeypatch.setenv(precision.AMX_ENV, "1")
    assert params.from_dict(CLASS_PARAMS).seed_floor.seeds == 3
    monkeypatch.setenv(precision.AMX_ENV, "yes")
    with pytest.raises(precision.PrecisionError, match="HIDDEN_SIGNATURES_AMX: 'yes' is not accepted; accepted: 0, 1"):
        params.from_dict(CLASS_PARAMS)


@pytest.mark.parametrize("section, bad, message", [
    ("fp32_cpu", {"train": {"tokenz": 1}}, "fp32_cpu overrides: train.tokenz: unknown key"),
    ("bf16_without_amx", {"seed_flor": {"seeds": 2}}, "bf16_without_amx overrides: seed_flor: unknown key")])
def test_a_typo_in_a_cpu_class_section_is_caught_on_every_machine(monkeypatch, section, bad, message) -> None:
    machine(monkeypatch, AMX)  # where neither section applies
    with pytest.raises(params.ParamsError, match=message):
        params.from_dict({**CLASS_PARAMS, section: bad})


@pytest.mark.parametrize("feats, quick, said", [
    (AVX2, False, "this CPU computes bf16 slowly, so fp32 and the params' fp32_cpu budgets apply: train.tokens: 40000"),
    (AVX2, True, "so fp32 and the params' fp32_cpu budgets apply: train.tokens: 10000"),
    (ZEN4, False, "without AMX tiles (about 2x fp32, not 5x), so the params' bf16_without_amx budgets apply: "
                  "analysis.splice_seqs: 4, seed_floor.seeds: 2"),
    (AMX, False, None)])
def test_runner_says_what_the_cpu_class_budgets_change(monkeypatch, capsys, feats, quick, said) -> None:
    """The line names the values the section changes in this run: on a full run not its quick.* ones,
    under --quick those (train.tokens 10000, not the full run's 40000)."""
    from hidden_signatures.run import runner

    machine(monkeypatch, feats)
    plain = params.from_dict(CLASS_PARAMS, quick=quick, overlays=False)
    runner.say_cpu_budget(params.from_dict(CLASS_PARAMS, quick=quick), plain)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == (0 if said is None else 1)
    assert said is None or lines[0].endswith(said)
