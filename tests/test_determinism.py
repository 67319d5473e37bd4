"""Determinism (issue 9): each stage, run twice on the same inputs into separate roots, writes the same bytes.

Stages: token ids (same and different tokenizers), activation stores, the trained crosscoder,
metrics/strengths, and the exported figures (PNG export needs a Chromium; skipped without one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, train_tokenizer

from hidden_signatures import io
from hidden_signatures.analysis import figures
from hidden_signatures.data import corpus
from hidden_signatures.run import pipeline
from hidden_signatures.run import point_analysis as analysis
from hidden_signatures.crosscoders import crosscoder as cc_mod
from hidden_signatures.run import params
from hidden_signatures.crosscoders import train as tr

ENV_CACHE, ENV_RESULTS, ENV_FIGURES = io.CACHE_ENV, pipeline.RESULTS_ENV, pipeline.FIGURES_ENV
POINT = "middle"


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path (atomic-write leftovers would show up here too)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def chromium_missing() -> str | None:
    """Why PNG export cannot run here, or None when a Chromium is available."""
    try:
        figures.find_chromium()
    except RuntimeError as exc:
        return f"PNG export needs a Chromium: {exc}"
    return None


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Two Llamas of equal width sharing a tokenizer, and one GPT-2 with a different tokenizer."""
    root = tmp_path_factory.mktemp("det-models")
    other_tok = train_tokenizer(vocab_size=400)  # 256 bytes + merges: other token boundaries
    return {"a": save_tiny_model(root / "a", "llama", hidden=32, seed=1, tokenizer=tiny_tokenizer),
            "b": save_tiny_model(root / "b", "llama", hidden=32, seed=2, tokenizer=tiny_tokenizer),
            "c": save_tiny_model(root / "c", "gpt2", hidden=24, seed=3, tokenizer=other_tok)}


def tiny_run(a: Path, b: Path, text_file: Path, dtype: str = "auto", **harvest) -> params.RunConfig:
    """A validated RunConfig with tiny sizes: 4-block models, 16-token sequences, 2000 harvested tokens."""
    return params.from_dict({
        "name": "determinism", "model_a": str(a), "model_b": str(b), "layers": [POINT],
        "corpus": {"source": str(text_file), "seq_len": 16},
        "harvest": {"batch_size": 8, "max_tokens": 2000, "dtype": dtype, **harvest},
        "crosscoder": {"dict_size": 128},
        "train": {"tokens": 24 * 128, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 8, "log_every": 4,
                  "dtype": dtype},
        "analysis": {"eval_tokens": 400, "splice_seqs": 2}, "device": "cpu"})


@pytest.fixture(scope="module")
def run(model_dirs, text_file) -> params.RunConfig:
    """The same-tokenizer pair (two Llamas of width 32)."""
    return tiny_run(model_dirs["a"], model_dirs["b"], text_file)


# -- tokens and stores: two cache roots ------------------------------------------------------------------
def test_token_ids_are_identical_across_cache_roots(run, tmp_path, monkeypatch) -> None:
    results = []
    for i in (1, 2):
        monkeypatch.setenv(ENV_CACHE, str(tmp_path / f"cache{i}"))
        tokenizer = pipeline.load_tokenizer(run.model_a)  # loaded afresh, as each run does
        ids = {part: corpus.tokenize_part(run.corpus, tokenizer, part) for part in ("crosscoder", "heldout")}
        results.append((ids, tree_bytes(tmp_path / f"cache{i}")))
    (ids_1, files_1), (ids_2, files_2) = results
    assert ids_1["crosscoder"].shape[0] > 10 and ids_1["crosscoder"].shape[1] == run.corpus.seq_len
    for part in ids_1:
        assert torch.equal(ids_1[part], ids_2[part]), part
    assert any(name.startswith("tokens/") for name in files_1)
    assert files_1 == files_2


def test_aligned_tokens_of_different_tokenizers_are_identical(model_dirs, text_file, tmp_path, monkeypatch) -> None:
    # Byte-level tokens against merged ones pair up at about a quarter of positions: no warning wanted here.
    run = tiny_run(model_dirs["a"], model_dirs["c"], text_file, min_aligned_fraction=0.1)
    results = []
    for i in (1, 2):
        monkeypatch.setenv(ENV_CACHE, str(tmp_path / f"cache{i}"))
        results.append((pipeline.pair_tokens(run), tree_bytes(tmp_path / f"cache{i}")))
    (t1, files_1), (t2, files_2) = results
    assert not t1.same_tokenizer and t1.n_pairs > 100
    assert torch.equal(t1.ids_a, t2.ids_a) and torch.equal(t1.ids_b, t2.ids_b)
    assert all(torch.equal(p, q) for p, q in zip(t1.pos_a + t1.pos_b, t2.pos_a + t2.pos_b))
    assert t1.aligned_fraction == t2.aligned_fraction
    assert files_1 == files_2


def test_activation_stores_are_identical_across_cache_roots(run, tmp_path, monkeypatch) -> None:
    trees = []
    for i in (1, 2):
        monkeypatch.setenv(ENV_CACHE, str(tmp_path / f"cache{i}"))
        store_a, store_b = pipeline.harvest(run, pipeline.pair_tokens(run), pipeline.validate(run))
        assert store_a.directory != store_b.directory and store_a.n_tokens >= 2000
        trees.append(tree_bytes(tmp_path / f"cache{i}" / "activations"))
    names = sorted(trees[0])
    assert sum(name.endswith(".bin") for name in names) == 2, names  # one layer file per model
    assert trees[0] == trees[1]


# -- crosscoder, metrics, figures: one store, two results roots, in each precision -------------------------
PRECISIONS = ("float32", "bfloat16")


_TRAINED: dict[str, dict] = {}


def train_twice(model_dirs, text_file, tmp_path_factory, dtype: str) -> dict:
    """Train and analyse the same point twice from one shared store, into two results/figures roots (once per dtype)."""
    if dtype in _TRAINED:
        return _TRAINED[dtype]
    run = tiny_run(model_dirs["a"], model_dirs["b"], text_file, dtype=dtype)
    base = tmp_path_factory.mktemp(f"det-results-{dtype}")
    skip_png = chromium_missing()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_CACHE, str(base / "cache"))
        if skip_png:  # metrics are still compared; the figure tests skip with the reason
            mp.setattr(analysis, "layer_figures", lambda *args, **kwargs: None)
        data = pipeline.open_pair(run, POINT)
        for i in (1, 2):
            mp.setenv(ENV_RESULTS, str(base / f"results{i}"))
            mp.setenv(ENV_FIGURES, str(base / f"figures{i}"))
            pipeline.train_layer(run, POINT, data)
            analysis.analyse_layer(run, POINT, data)
    _TRAINED[dtype] = {"results": [base / f"results{i}" / run.name / POINT for i in (1, 2)],
                       "figures": [base / f"figures{i}" / run.name / POINT for i in (1, 2)], "skip_png": skip_png,
                       "dtype": dtype}
    return _TRAINED[dtype]


@pytest.fixture(scope="module", params=PRECISIONS)
def trained_twice(model_dirs, text_file, tmp_path_factory, request) -> dict:
    """The same point trained and analysed twice in one precision (explicit in params: auto is not involved)."""
    return train_twice(model_dirs, text_file, tmp_path_factory, request.param)


def test_the_two_precisions_give_different_crosscoders(model_dirs, text_file, tmp_path_factory) -> None:
    """bf16 and fp32 runs really differ, so byte-identity is a promise per precision, not a no-op."""
    fp32, bf16 = (train_twice(model_dirs, text_file, tmp_path_factory, d)["results"][0] for d in PRECISIONS)
    assert (fp32 / cc_mod.WEIGHTS_FILE).read_bytes() != (bf16 / cc_mod.WEIGHTS_FILE).read_bytes()
    m32, m16 = (io.read_json(d / pipeline.METRICS_FILE) for d in (fp32, bf16))
    assert m32["precision"]["train"] == "float32" and m16["precision"]["train"] == "bfloat16"
    assert m32["sharedness"] == pytest.approx(m16["sharedness"], abs=0.05)  # close, not equal


def test_trained_crosscoder_is_identical(trained_twice) -> None:
    first, second = trained_twice["results"]
    for name in (cc_mod.WEIGHTS_FILE, cc_mod.CONFIG_FILE, pipeline.RUN_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    m1, m2 = cc_mod.load(first), cc_mod.load(second)
    for name in cc_mod.PARAM_NAMES:
        assert torch.equal(getattr(m1, name), getattr(m2, name)), name
    log_1, log_2 = (io.read_json(d / tr.LOG_FILE) for d in (first, second))
    assert len(log_1) == 6
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in log_1] == \
        [{k: v for k, v in row.items() if k != "seconds"} for row in log_2]


@pytest.mark.parametrize("name", [pipeline.METRICS_FILE, analysis.STRENGTHS_FILE, analysis.STRENGTHS_CSV,
                                  analysis.SCALING_FILE, tr.CURVE_FILE])
def test_analysis_outputs_are_identical(name, trained_twice) -> None:
    first, second = trained_twice["results"]
    assert (first / name).stat().st_size > 0
    assert (first / name).read_bytes() == (second / name).read_bytes()


def test_metrics_cover_the_stochastic_parts(trained_twice) -> None:
    """The compared metrics include the seeded permutation null and splice-in numbers, not only decoder math."""
    metrics = io.read_json(trained_twice["results"][0] / pipeline.METRICS_FILE)
    assert metrics["point"] == POINT and metrics["tokens_trained"] == 24 * 128
    assert metrics["alignment_null_permutation"] is not None and metrics["splice"] is not None
    assert "shared_cosine_mean" in metrics  # equal widths: the cosine figure and number are made too
    assert metrics["precision"]["harvest"] == metrics["precision"]["train"] == trained_twice["dtype"]
    assert metrics["precision"]["capability"] and isinstance(metrics["precision"]["bf16_native"], bool)


FIGURE_FILES = ["relative_norms.png", "cca_spectrum.png", "shared_cosines.png", "relative_norms.html",
                "convergence.png"]


@pytest.mark.parametrize("name", FIGURE_FILES)
def test_figures_are_identical(name, trained_twice) -> None:
    if trained_twice["skip_png"]:
        pytest.skip(trained_twice["skip_png"])
    first, second = trained_twice["figures"]
    data = (first / name).read_bytes()
    if name.endswith(".png"):
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert data == (second / name).read_bytes()
