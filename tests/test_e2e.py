"""End to end through papermill: tiny random models, then SmolLM2 with a small budget.

The executed notebooks are left under $HS_TEST_ARTIFACTS/results for the nbval pass that
`run_all.sh test` runs after pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_TEXT, artifacts_root, save_tiny_model, train_tokenizer

LAYERS = ("first", "middle", "last")


def run_pipeline(params_path: Path, roots: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HIDDEN_SIGNATURES_CACHE=str(roots / "cache"),
               HIDDEN_SIGNATURES_RESULTS=str(roots / "results"), HIDDEN_SIGNATURES_FIGURES=str(roots / "figures"),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "-m", "hidden_signatures.runner", str(params_path), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def write_params(path: Path, **fields) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_inputs() -> Path:
    base = artifacts_root() / "inputs"
    tok = train_tokenizer(300)
    if not (base / "tiny-a" / "config.json").exists():
        save_tiny_model(base / "tiny-a", "llama", n_layers=4, hidden=32, seed=1, tokenizer=tok)
        save_tiny_model(base / "tiny-b", "llama", n_layers=4, hidden=48, seed=2, tokenizer=tok)
    corpus = base / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}. " + TINY_TEXT[i * 37: i * 37 + 900] for i in range(60)),
                      encoding="utf-8")
    return base


def tiny_params(inputs: Path, name: str = "tiny-e2e") -> Path:
    return write_params(
        inputs / f"{name}.yaml", name=name, model_a=str(inputs / "tiny-a"), model_b=str(inputs / "tiny-b"),
        layers=list(LAYERS), corpus={"source": str(inputs / "corpus.txt"), "seq_len": 32},
        harvest={"batch_size": 8}, crosscoder={"dict_size": 64},
        train={"tokens": 8192, "batch_size": 256, "lr": 3e-3, "checkpoint_every": 8, "log_every": 4},
        analysis={"eval_tokens": 2000}, device="cpu", relationship="scale",
        variants={"middle": [{"architecture": "batchtopk", "k": 8}]}, seed_floor={"seeds": 2})


def test_tiny_pair_end_to_end(tiny_inputs):
    roots = artifacts_root()
    proc = run_pipeline(tiny_params(tiny_inputs), roots, "--quick")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = proc.stdout.strip().splitlines()[-1]  # where the wall time went, notebook by notebook
    assert re.fullmatch(r"all done in \d+ s on \d+ job slot\(s\); job-minutes by notebook: (\w+ \d+\.\d, )+"
                        r"\w+ \d+\.\d; total \d+\.\d", done), done
    assert all(f"{nb} " in done for nb in ("00_models", "03_train", "04_analysis", "07_validation", "99_summary"))
    for layer in LAYERS:
        out = roots / "results" / "tiny-e2e" / layer
        assert (out / "crosscoder.safetensors").stat().st_size > 0
        metrics = json.loads((out / "metrics.json").read_text())
        for key in ("sharedness", "alignment", "explained_variance", "l0", "dead_fraction", "tokens_trained", "tokens", "converged"):
            assert key in metrics, key
        assert set(metrics["explained_variance"]) == {"A", "B"}
        assert metrics["d_a"] == 32 and metrics["d_b"] == 48
        for suffix in ("png", "html"):
            assert (roots / "figures" / "tiny-e2e" / layer / f"relative_norms.{suffix}").exists()
        for nb in ("03_train", "04_analysis", "05_strengths"):
            assert (out / f"{nb}.ipynb").exists()
    for point in ("middle-batchtopk", "middle-seed1"):
        metrics = json.loads((roots / "results" / "tiny-e2e" / point / "metrics.json").read_text())
        assert metrics["layer"] == "middle" and metrics["point"] == point
    assert (roots / "results" / "validation" / "validation.json").exists()
    summary = (roots / "figures" / "summary" / "summary.csv").read_text()
    assert "batchtopk" in summary and "sharedness_spread" in summary


def test_tiny_pair_is_deterministic(tiny_inputs, tmp_path):
    """A second run from scratch (own results, shared caches) gives byte-identical metrics and PNGs."""
    first = artifacts_root()
    if not (first / "results" / "tiny-e2e" / "middle" / "metrics.json").exists():
        pytest.skip("needs test_tiny_pair_end_to_end first")
    second = tmp_path / "again"
    (second / "cache").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(first / "cache", second / "cache")
    proc = run_pipeline(tiny_params(tiny_inputs), second, "--no-summary")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for layer in LAYERS:
        a = first / "results" / "tiny-e2e" / layer / "metrics.json"
        b = second / "results" / "tiny-e2e" / layer / "metrics.json"
        assert a.read_bytes() == b.read_bytes()
        for fig in ("relative_norms.png", "cca_spectrum.png"):
            assert (first / "figures" / "tiny-e2e" / layer / fig).read_bytes() == \
                   (second / "figures" / "tiny-e2e" / layer / fig).read_bytes()


@pytest.mark.slow
def test_smollm2_small_budget(tmp_path):
    """The real packaged model, identical pair, a small budget: identical models look shared."""
    roots = artifacts_root()
    params = write_params(
        artifacts_root() / "inputs" / "smollm2-small.yaml", name="smollm2-small", model_a="smollm2-135m",
        model_b="smollm2-135m", layers=["first", "last"], corpus={"seq_len": 128},
        harvest={"max_tokens": 6000, "batch_size": 8}, crosscoder={"dict_size": 512},
        train={"tokens": 60_000, "batch_size": 512, "lr": 2e-3, "checkpoint_every": 50},
        analysis={"eval_tokens": 1000}, device="auto", relationship="sanity")
    proc = run_pipeline(params, roots, "--no-summary")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for layer in ("first", "last"):
        metrics = json.loads((roots / "results" / "smollm2-small" / layer / "metrics.json").read_text())
        assert metrics["d_a"] == metrics["d_b"] == 576
        assert metrics["block_a"] == metrics["block_b"] == {"first": 0, "last": 29}[layer]
        assert metrics["sharedness"] > 0.9
        assert metrics["cka"] > 0.999


def test_made_models_end_to_end(tiny_inputs):
    """finetune:/distill-kl:/distill-jacobian: models are built by 00_models, compared, and 06 runs."""
    roots = artifacts_root()
    teacher = tiny_inputs / "tiny-a"
    common = dict(layers=["first", "last"], corpus={"source": str(tiny_inputs / "corpus.txt"), "seq_len": 32},
                  crosscoder={"dict_size": 64}, analysis={"eval_tokens": 1000}, device="cpu",
                  train={"tokens": 4096, "batch_size": 256, "lr": 3e-3},
                  finetune={"corpus": "python-code", "steps": 4, "batch_size": 2, "warmup_steps": 1,
                            "checkpoint_every": 2, "eval_every": 2},
                  distill={"steps": 4, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2, "n_dirs": 1,
                           "jac_max_seqs": 1, "eval_every": 2})
    files = [write_params(tiny_inputs / f"{name}.yaml", name=name, model_a=str(teacher),
                          model_b=f"{kind}:{teacher}", relationship=rel, **common)
             for name, kind, rel in (("tiny-finetuned", "finetune", "finetuning"),
                                     ("distill-kl", "distill-kl", "distillation"),
                                     ("distill-jacobian", "distill-jacobian", "distillation"))]
    env = dict(os.environ, HIDDEN_SIGNATURES_CACHE=str(roots / "cache"),
               HIDDEN_SIGNATURES_RESULTS=str(roots / "results"), HIDDEN_SIGNATURES_FIGURES=str(roots / "figures"),
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "hidden_signatures.runner", "--quick", *map(str, files)],
                          cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, blocks_b in (("tiny-finetuned", 3), ("distill-kl", 1), ("distill-jacobian", 1)):
        m = json.loads((roots / "results" / name / "last" / "metrics.json").read_text())
        assert m["block_a"] == 3 and m["block_b"] == blocks_b  # students have half the blocks
        assert m["model_b"].split(":")[0] in ("finetune", "distill-kl", "distill-jacobian")
    assert (roots / "results" / "06_distill.ipynb").exists()
    derived = list((roots / "cache" / "derived").iterdir())
    assert {d.name.split("-")[0] for d in derived} >= {"finetune", "distill"}
    for made in (d for d in derived if d.is_dir() and not d.name.startswith(".")):  # learning curves: steps 0, 2, 4
        curve = [row for row in json.loads((made / "log.json").read_text()) if "eval_step" in row]
        assert [row["eval_step"] for row in curve] == [0, 2, 4], made.name
        keys = {"heldout_ce_domain", "heldout_ce_crosscoder_text"} if made.name.startswith("finetune") \
            else {"heldout_ce", "jacobian_agreement"}
        assert keys <= set(curve[-1]), made.name
    config = json.loads((next(d for d in derived if d.name.startswith("finetune")) / "model" / "train_config.json")
                        .read_text())
    assert config["info"]["corpus"] == "python-code"
