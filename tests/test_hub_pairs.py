"""The paper's own pairs (params/gpt2-same, gpt2-distilgpt2, pythia-160m-70m, gemma2-2b-it).

They need the hub, so the real files are only loaded here; their plumbing is run on tiny random
models of the same architecture family and the same depths, which must resolve the paper's layer
mapping and carry one layer through harvest -> train -> analysis.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import ROOT, save_tiny_model, train_tokenizer
from hidden_signatures.run import params, pipeline
from hidden_signatures.run import point_analysis as analysis
from hidden_signatures.data.corpus import CorpusConfig
from hidden_signatures.run.params import ParamsError, RunConfig

PARAMS_DIR = ROOT / "params"


@dataclass(frozen=True)
class HubPair:
    """What a params file must say, and the tiny stand-ins that mirror its models."""

    name: str
    hub_a: str
    hub_b: str
    relationship: str
    arch: str
    blocks_a: int
    blocks_b: int
    width_a: int
    width_b: int
    layers: dict[str, tuple[int, int]]
    """label -> (block in A, block in B): the paper's mapping."""
    train_tokens: int = 200_000_000


PAIRS = (
    HubPair("gpt2-same", "gpt2", "gpt2", "sanity", "gpt2", 12, 12, 32, 32,
            {"first": (0, 0), "middle": (6, 6), "last": (11, 11)}),
    HubPair("gpt2-distilgpt2", "gpt2", "distilgpt2", "distillation", "gpt2", 12, 6, 32, 32,
            {"first": (0, 0), "middle": (6, 3), "last": (11, 5)}),
    # widths 48 vs 32 mirror 768 vs 512: the scale pair's widths differ
    HubPair("pythia-160m-70m", "EleutherAI/pythia-160m", "EleutherAI/pythia-70m", "scale", "gpt_neox",
            12, 6, 48, 32, {"first": (0, 0), "middle": (6, 3), "last": (11, 5)}),
    HubPair("gemma2-2b-it", "google/gemma-2-2b", "google/gemma-2-2b-it", "finetuning", "gemma2", 26, 26, 32, 32,
            {"first": (0, 0), "middle": (13, 13), "last": (25, 25)}, train_tokens=400_000_000),
)
POINT = "middle"  # the layer run end to end: where the depths differ most


def params_path(pair: HubPair) -> Path:
    return PARAMS_DIR / f"{pair.name}.yaml"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Callable[[str, int, int, int], Path]:
    """Lazily built tiny random models keyed by (arch, blocks, width, seed), sharing one tokenizer."""
    tok = train_tokenizer(300)
    root = tmp_path_factory.mktemp("hub-standins")
    built: dict[tuple[str, int, int, int], Path] = {}

    def get(arch: str, blocks: int, width: int, seed: int) -> Path:
        key = (arch, blocks, width, seed)
        if key not in built:
            built[key] = save_tiny_model(root / f"{arch}-{blocks}x{width}-s{seed}", arch, n_layers=blocks,
                                         hidden=width, seed=seed, tokenizer=tok)
        return built[key]

    return get


def stand_in(run: RunConfig, pair: HubPair, get_model: Callable[[str, int, int, int], Path],
             corpus_path: Path) -> RunConfig:
    """The real params with tiny same-depth models, a local corpus, tiny budgets and the CPU."""
    dir_a = get_model(pair.arch, pair.blocks_a, pair.width_a, 1)
    # an identical pair stays identical (one directory); the others get their own weights
    dir_b = dir_a if pair.hub_a == pair.hub_b else get_model(pair.arch, pair.blocks_b, pair.width_b, 2)
    return dataclasses.replace(
        run, model_a=str(dir_a), model_b=str(dir_b),
        corpus=CorpusConfig(source=str(corpus_path), seq_len=32),
        harvest=dataclasses.replace(run.harvest, max_tokens=600, batch_size=8),
        crosscoder=dataclasses.replace(run.crosscoder, dict_size=256),
        train=dataclasses.replace(run.train, tokens=1024, batch_size=256, lr=1e-3, checkpoint_every=2,
                                  log_every=1),
        analysis=dataclasses.replace(run.analysis, eval_tokens=200, splice_seqs=1),
        device="cpu")


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_file_holds_the_papers_settings(pair: HubPair) -> None:
    """Models, relationship, dictionary, sparsity, optimiser, budget and corpus as in the paper."""
    run, quick = params.load(params_path(pair)), params.load(params_path(pair), quick=True)
    assert (run.model_a, run.model_b, run.relationship) == (pair.hub_a, pair.hub_b, pair.relationship)
    assert [lp.label for lp in run.layers] == list(pair.layers)
    assert run.crosscoder.dict_size == 2**14 and run.crosscoder.l1_coeff == 2.0
    assert (run.train.lr, run.train.batch_size, run.train.tokens) == (5e-5, 4096, pair.train_tokens)
    assert run.corpus.seq_len == 1024 and run.corpus.source.startswith("hf:") and run.corpus.max_chars
    assert run.harvest.max_tokens == 1_000_000 and run.device == "auto"
    assert quick.train.tokens < run.train.tokens and quick.harvest.max_tokens < run.harvest.max_tokens
    assert quick.corpus.max_chars < run.corpus.max_chars
    defaults = (PARAMS_DIR / "default_pairs.txt").read_text(encoding="utf-8").split()
    assert pair.name not in defaults  # hub pairs are opt-in


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_stand_ins_resolve_mapping_and_run_one_layer(pair: HubPair, tiny_models, text_file, isolated_roots) -> None:
    """Same-depth tiny models resolve the paper's blocks; one layer goes harvest -> train -> analysis."""
    run = stand_in(params.load(params_path(pair)), pair, tiny_models, text_file)
    resolved = pipeline.validate(run)
    assert {label: (rl.a, rl.b) for label, rl in resolved.items()} == pair.layers

    data = pipeline.open_pair(run, POINT)
    out = pipeline.train_layer(run, POINT, data)
    assert out == isolated_roots / "results" / pair.name / POINT
    result = analysis.analyse_layer(run, POINT, data)

    saved = json.loads((out / pipeline.METRICS_FILE).read_text(encoding="utf-8"))
    assert (saved["d_a"], saved["d_b"]) == (pair.width_a, pair.width_b)
    assert (saved["block_a"], saved["block_b"]) == pair.layers[POINT]
    assert saved["relationship"] == pair.relationship and saved["dict_size"] == 256
    assert saved["sharedness"] == pytest.approx(result["sharedness"], abs=1e-6)
    assert 0.0 <= saved["sharedness"] <= 1.0
    if pair.hub_a == pair.hub_b:  # one store serves both sides: the raw activations coincide
        assert saved["cka"] == pytest.approx(1.0, abs=1e-6)
    assert (isolated_roots / "figures" / pair.name / POINT / "relative_norms.png").exists()


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_uncached_hub_id_offline_is_one_clear_line(pair: HubPair, tiny_models, tmp_path, monkeypatch) -> None:
    """Offline and not in the hub cache: validate names the field and the model in one line."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    run = params.load(params_path(pair))
    with pytest.raises(ParamsError) as exc:
        pipeline.validate(run)
    message = str(exc.value)
    assert message.startswith(f"model_a: model {pair.hub_a!r}") and "offline" in message
    assert "\n" not in message

    local_a = dataclasses.replace(run, model_a=str(tiny_models("gpt2", 2, 32, 1)))
    with pytest.raises(ParamsError) as exc:
        pipeline.validate(local_a)
    assert str(exc.value).startswith(f"model_b: model {pair.hub_b!r}") and "\n" not in str(exc.value)
