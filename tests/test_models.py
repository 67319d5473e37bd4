"""Tests for models.py: layer specs, block discovery per architecture, loading, spec checks, devices."""

from __future__ import annotations

import json

import importlib.util

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from hidden_signatures.models import loading as models

ARCH_BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "llama": "model.layers",
               "gemma2": "model.layers"}


# -- resolve_layer -------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, n_blocks, expected", [
    ("first", 12, 0), ("first", 30, 0),
    ("middle", 12, 6), ("middle", 6, 3), ("middle", 30, 15), ("middle", 18, 9), ("middle", 1, 0),
    ("last", 12, 11), ("last", 30, 29), ("last", 18, 17),
    (0, 12, 0), (7, 12, 7), (11, 12, 11), (-1, 12, 11), (-12, 12, 0), (-3, 30, 27),
])
def test_resolve_layer_accepts_names_and_integers(layer, n_blocks, expected) -> None:
    assert models.resolve_layer(layer, n_blocks) == expected


@pytest.mark.parametrize("layer, n_blocks, needles", [
    (12, 12, ["12", "0..11", "12 blocks"]),
    (100, 30, ["100", "0..29"]),
    (-13, 12, ["-13", "-12..-1", "0..11"]),
    ("midle", 12, ["'midle'", "first, middle, last", "[0, 11]"]),
    ("Middle", 6, ["'Middle'", "[0, 5]"]),
    ("", 6, ["''", "first, middle, last"]),
    (1.5, 12, ["1.5", "first, middle, last", "[0, 11]"]),
    (True, 12, ["True", "first, middle, last"]),
    (None, 12, ["None", "first, middle, last"]),
])
def test_resolve_layer_rejects_with_value_and_range(layer, n_blocks, needles) -> None:
    with pytest.raises(ValueError) as err:
        models.resolve_layer(layer, n_blocks)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# -- blocks of each architecture ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCH_BLOCKS))
def test_block_discovery_per_architecture(arch: str) -> None:
    cfg = tiny_config(arch, n_layers=3, hidden=32)
    model = AutoModelForCausalLM.from_config(cfg)
    blocks = models.block_list(model)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 3
    assert models.block_path(model) == ARCH_BLOCKS[arch]
    assert model.get_submodule(ARCH_BLOCKS[arch]) is blocks
    assert models.num_blocks(model) == models.num_blocks(cfg) == 3
    assert models.hidden_size(model) == models.hidden_size(cfg) == 32


def test_block_list_picks_shallowest_list_of_the_right_length() -> None:
    # A deeper ModuleList as long as the block list (e.g. inside a block) must not be taken for it.
    model = AutoModelForCausalLM.from_config(tiny_config("llama", n_layers=2))
    model.model.layers[0].extra = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    assert models.block_path(model) == "model.layers"


def test_num_blocks_and_hidden_size_fail_clearly_on_foreign_configs() -> None:
    class Bare:
        pass

    with pytest.raises(ValueError, match="number of blocks"):
        models.num_blocks(Bare())
    with pytest.raises(ValueError, match="hidden size"):
        models.hidden_size(Bare())


# -- load_model ------------------------------------------------------------------------------------
def test_load_model_from_local_dir_is_eval_frozen_bf16(tiny_llama_dir) -> None:
    model, tok = models.load_model(str(tiny_llama_dir))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).device.type == "cpu"
    assert tok.bos_token_id is not None and len(tok) == model.config.vocab_size
    assert models.model_shape(str(tiny_llama_dir)) == (4, 32)


def test_load_model_float32_on_request(tiny_llama_dir) -> None:
    model, _ = models.load_model(str(tiny_llama_dir), dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_load_model_refuses_dir_without_config(tmp_path) -> None:
    with pytest.raises(models.ModelSpecError, match="no config.json"):
        models.load_model(str(tmp_path))


# -- check_spec ------------------------------------------------------------------------------------
def test_check_spec_accepts_a_model_dir(tiny_llama_dir) -> None:
    models.check_spec(str(tiny_llama_dir))


@pytest.mark.parametrize("spec", ["", "   "])
def test_check_spec_empty(spec: str) -> None:
    with pytest.raises(models.ModelSpecError, match="is empty.*smollm2-135m"):
        models.check_spec(spec)


def test_check_spec_missing_dir(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(models.ModelSpecError, match="no such directory") as err:
        models.check_spec(str(missing))
    assert str(missing) in str(err.value)


def test_check_spec_file_is_not_a_dir(tmp_path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(models.ModelSpecError, match="no such directory"):
        models.check_spec(str(path))


def test_check_spec_dir_without_config(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(models.ModelSpecError, match="no config.json"):
        models.check_spec(str(tmp_path))


@pytest.mark.parametrize("name", sorted(models.PACKAGED))
def test_check_spec_packaged_name_without_its_package(name: str, monkeypatch) -> None:
    package = models.PACKAGED[name].package
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a, **k: None if mod == package else real_find_spec(mod, *a, **k))
    with pytest.raises(models.ModelSpecError) as err:
        models.check_spec(name)
    assert package in str(err.value) and "pip install" in str(err.value)


def test_check_spec_packaged_name_with_its_package(monkeypatch) -> None:
    package = models.PACKAGED["smollm2-135m"].package
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a, **k: object() if mod == package else real_find_spec(mod, *a, **k))
    models.check_spec("smollm2-135m")  # cheap: no conversion, no load


def test_check_spec_offline_unknown_hub_id(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelSpecError, match="not in the local hub cache while offline") as err:
        models.check_spec("no-such-org/no-such-model")
    assert "'no-such-org/no-such-model'" in str(err.value)


@pytest.mark.parametrize("spec", ["a/b/c", "my model"])
def test_check_spec_malformed_hub_id(spec: str) -> None:
    with pytest.raises(models.ModelSpecError, match="not a packaged name"):
        models.check_spec(spec)


# -- pick_device -----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_pick_device_auto_is_cpu_without_cuda() -> None:
    assert models.pick_device("auto") == torch.device("cpu")
    assert models.pick_device() == torch.device("cpu")
    assert models.pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_pick_device_cuda_without_cuda(device: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available") as err:
        models.pick_device(device)
    assert repr(device) in str(err.value)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", ""])
def test_pick_device_rejects_non_devices(device: str) -> None:
    with pytest.raises(ValueError, match="not a device; accepted: auto, cpu, cuda") as err:
        models.pick_device(device)
    assert repr(device) in str(err.value)


def _report_run(model_dir, text_file):
    """A pair of the tiny model on the small text file: enough for model_report."""
    from hidden_signatures.run import params

    return params.from_dict({"name": "r", "model_a": str(model_dir), "model_b": str(model_dir),
                             "layers": ["first"], "corpus": {"source": str(text_file), "seq_len": 16},
                             "device": "cpu"})


def _count_loads(monkeypatch) -> list:
    """Patch models.load_model to record each call in the returned list (a measured report loads)."""
    calls = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    return calls


def test_model_report_is_measured_once_per_model_files_and_corpus(tiny_llama_dir, text_file, isolated_roots,
                                                                  monkeypatch, tmp_path) -> None:
    """A second pair with the same model reads the cached report; changed weights are measured again."""
    import shutil
    import time

    from hidden_signatures.run import pipeline

    run = _report_run(tiny_llama_dir, text_file)
    first = pipeline.model_report(run, str(tiny_llama_dir), max_seqs=4)
    assert first["held-out loss"] > 0 and first["blocks"] == 4
    calls = _count_loads(monkeypatch)
    assert pipeline.model_report(run, str(tiny_llama_dir), max_seqs=4) == first
    assert calls == []
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "copy")
    assert pipeline.model_report(run, str(copy), max_seqs=4)["held-out loss"] == first["held-out loss"]
    assert len(calls) == 1  # another directory: measured
    weights = next(copy.glob("*.safetensors"))
    time.sleep(0.01)
    weights.write_bytes(weights.read_bytes())  # rewritten (e.g. a rebuilt model): measured again
    pipeline.model_report(run, str(copy), max_seqs=4)
    assert len(calls) == 2


def test_display_name_of_a_made_model_never_holds_a_path(tmp_path) -> None:
    """Labels in metrics.json and figures name a local base by its directory, so two checkouts' results compare."""
    from hidden_signatures.run.model_info import display_name

    for root in (tmp_path / "checkout-a", tmp_path / "elsewhere" / "checkout-b"):
        base = root / "inputs" / "tiny-a"
        made = root / "cache" / "derived" / "finetune-0123" / "model"
        base.mkdir(parents=True)
        made.mkdir(parents=True)
        (made / "train_config.json").write_text(
            json.dumps({"info": {"kind": "finetune", "base": str(base)}}), encoding="utf-8")
        assert display_name(str(made)) == "finetune:tiny-a"
        assert display_name(str(base)) == "tiny-a"
    assert display_name("smollm2-135m") == "smollm2-135m"


def test_model_report_of_a_named_model_survives_a_moved_cache(tiny_llama_dir, text_file, tmp_path,
                                                              monkeypatch) -> None:
    """A named model's report is keyed by its name and files, not by the cache's path: a cache
    moved (or reached through another path) keeps its reports. (A path spec stays keyed by its path:
    the test above, whose copied directory is measured again.)"""
    import shutil

    from hidden_signatures import io
    from hidden_signatures.run import pipeline

    old, new = tmp_path / "old-cache", tmp_path / "new-cache"
    shutil.copytree(tiny_llama_dir, old / "models" / "tiny-named")
    monkeypatch.setenv("HIDDEN_SIGNATURES_CACHE", str(old))
    real_resolve = models.resolve_spec
    monkeypatch.setattr(models, "resolve_spec", lambda spec: str(io.cache_root() / "models" / spec)
                        if spec == "tiny-named" else real_resolve(spec))
    run = _report_run(tiny_llama_dir, text_file)
    first = pipeline.model_report(run, "tiny-named", max_seqs=4)
    old.rename(new)
    monkeypatch.setenv("HIDDEN_SIGNATURES_CACHE", str(new))
    calls = _count_loads(monkeypatch)
    assert pipeline.model_report(run, "tiny-named", max_seqs=4) == first
    assert calls == []


def test_model_report_of_a_made_model_survives_a_moved_cache(tiny_llama_dir, text_file, tmp_path,
                                                             monkeypatch) -> None:
    """A made model's spec is its built directory inside the cache: keyed by that directory relative to
    the cache, so a moved cache keeps its report; a directory outside the cache stays keyed by its path."""
    import shutil
    from pathlib import Path

    from hidden_signatures.run import pipeline

    old, new = tmp_path / "old-cache", tmp_path / "new-cache"
    built = Path("derived") / "finetune-0123" / "model"
    shutil.copytree(tiny_llama_dir, old / built)
    monkeypatch.setenv("HIDDEN_SIGNATURES_CACHE", str(old))
    run = _report_run(tiny_llama_dir, text_file)
    first = pipeline.model_report(run, str(old / built), max_seqs=4)
    old.rename(new)
    monkeypatch.setenv("HIDDEN_SIGNATURES_CACHE", str(new))
    calls = _count_loads(monkeypatch)
    assert pipeline.model_report(run, str(new / built), max_seqs=4) == first
    assert calls == []
    outside = shutil.copytree(new / built, tmp_path / "elsewhere" / built)
    pipeline.model_report(run, str(outside), max_seqs=4)
    assert len(calls) == 1
