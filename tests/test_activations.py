"""Tests for activations.py: harvested rows equal hidden_states, store reuse, repair, resume, pairing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model

from hidden_signatures import io
from hidden_signatures.harvest import activations
from hidden_signatures.models import loading as models

ARCHS = ("llama", "gpt2", "gpt_neox", "gemma2")
LAYERS = [0, 2]
SEQ_LEN = 12


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """One tiny random model per architecture (4 blocks, width 32), saved as an HF directory."""
    root = tmp_path_factory.mktemp("act-models")
    return {arch: save_tiny_model(root / arch, arch, tokenizer=tiny_tokenizer) for arch in ARCHS}


def make_ids(n_seqs: int, vocab: int, bos: int, seed: int = 0) -> torch.Tensor:
    """Random token sequences [S, SEQ_LEN] starting with BOS."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n_seqs, SEQ_LEN), generator=gen)
    ids[:, 0] = bos
    return ids


def as_float(rows_u16: np.ndarray) -> torch.Tensor:
    return activations.to_float(np.array(rows_u16))


def reference_rows(spec: str, ids: torch.Tensor, layer: int, positions: list[torch.Tensor],
                   dtype: torch.dtype) -> torch.Tensor:
    """hidden_states[layer] (the input of block `layer`) at the kept positions, from a full forward."""
    model, _ = models.load_model(spec, dtype=dtype)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer]
    return torch.cat([hidden[i, pos] for i, pos in enumerate(positions)]).to(torch.bfloat16).float()


# -- correctness -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_harvest_float32_equals_hidden_states(arch, model_dirs, tiny_tokenizer, tmp_path, monkeypatch) -> None:
    calls = []
    real_forward = activations._forward
    monkeypatch.setattr(activations, "_forward", lambda *a: calls.append(1) or real_forward(*a))
    spec = str(model_dirs[arch])
    ids = make_ids(5, len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    store = activations.harvest(spec, ids, LAYERS, batch_size=2, dtype="float32", root=tmp_path)
    assert len(calls) == 3  # both layers from one pass per batch
    positions = activations.all_but_first(*ids.shape)
    assert store.layers == LAYERS and store.d_model == 32 and store.n_tokens == 5 * (SEQ_LEN - 1)
    for layer in LAYERS:
        ref = reference_rows(spec, ids, layer, positions, torch.float32)
        # The store keeps bf16 bits, so the float32 reference is rounded to bf16 first.
        assert torch.equal(as_float(store.rows(layer)), ref), (arch, layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_harvest_bfloat16_matches_bf16_forward(arch, model_dirs, tiny_tokenizer, tmp_path) -> None:
    spec = str(model_dirs[arch])
    ids = make_ids(4, len(tiny_tokenizer), tiny_tokenizer.bos_token_id, seed=1)
    store = activations.harvest(spec, ids, LAYERS, batch_size=4, dtype="bfloat16", root=tmp_path)
    positions = activations.all_but_first(*ids.shape)
    for layer in LAYERS:
        ref = reference_rows(spec, ids, layer, positions, torch.bfloat16)
        got = as_float(store.rows(layer))
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1e-2)


def test_harvest_custom_positions_never_position_zero(model_dirs, tiny_tokenizer, tmp_path) -> None:
    spec = str(model_dirs["llama"])
    ids = make_ids(3, len(tiny_tokenizer), tiny_tokenizer.bos_token_id, seed=2)
    positions = [torch.tensor([1, 4, 5]), torch.tensor([2]), torch.tensor([3, 11])]
    store = activations.harvest(spec, ids, [1], positions=positions, dtype="float32", root=tmp_path)
    assert store.n_tokens == 6
    assert store.seq_ptr().tolist() == [0, 3, 4, 6]
    assert store.positions().tolist() == [1, 4, 5, 2, 3, 11]
    ref = reference_rows(spec, ids, 1, positions, torch.float32)
    assert torch.equal(as_float(store.rows(1)), ref)


def test_default_positions_skip_position_zero(model_dirs, tiny_tokenizer, tmp_path) -> None:
    ids = make_ids(3, len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    store = activations.harvest(str(model_dirs["gpt2"]), ids, [1], root=tmp_path)
    pos = store.positions()
    assert pos.min().item() == 1 and 0 not in pos.tolist()
    assert pos.tolist() == list(range(1, SEQ_LEN)) * 3


def test_harvest_stops_after_the_deepest_layer(model_dirs, tiny_tokenizer, tmp_path, monkeypatch) -> None:
    ran = []
    real_load = models.load_model

    def load_with_hooks(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        for i, block in enumerate(models.block_list(model)):
            block.register_forward_hook(lambda *_, i=i: ran.append(i))
        return model, tok

    monkeypatch.setattr(models, "load_model", load_with_hooks)
    ids = make_ids(2, len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    activations.harvest(str(model_dirs["llama"]), ids, [1], batch_size=2, root=tmp_path)
    assert 3 not in ran and 2 not in ran and 0 in ran


# -- reuse, repair, resume ---------------------------------------------------------------------------
def test_store_is_reused_without_running_the_model(model_dirs, tiny_tokenizer, tmp_path, monkeypatch) -> None:
    spec = str(model_dirs["llama"])
    ids = make_ids(4, len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    first = activations.harvest(spec, ids, LAYERS, root=tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the store exists")

    monkeypatch.setattr(models, "load_model", refuse)
    second = activations.harvest(spec, ids, list(reversed(LAYERS)), root=tmp_path)
    assert second.directory == first.directory
    for layer in LAYERS:
        assert np.array_equal(second.rows(layer), first.rows(layer))


def test_store_key_changes_with_data_layers_and_dtype(model_dirs, tiny_tokenizer) -> None:
    ids = make_ids(2, len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    pos = activations.all_but_first(*ids.shape)
    key = activations.store_key("m", ids, pos, [1], "bfloat16")
    other_ids = ids.clone()
    other_ids[1, 3] += 1
    assert key != activations.store_key("m", other_ids, pos, [1], "bfloat16")
    assert key != activations.store_key("m", ids, pos, [1, 2], "bfloat16")
    assert key != activations.store_key("m", ids, pos, [1], "float32")
    assert key != activations.store_key("m", ids, [pos[0], pos[1][:-1]], [1], "bfloat16")
    assert key != activations.store_key("other", ids, pos, [1], "bfloat16")


def test_truncated_layer_file_is_rebuilt(model_dirs, tiny_tokenizer, tmp_path) -> None:
    spec = str(model_dirs["gpt_neox"])
    ids = make_ids(4, len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    store = activations.harvest(spec, ids, LAYERS, root=tmp_path)
    good = {layer: np.array(store.rows(layer)) for layer in LAYERS}
    path = activations.layer_file(store.directory, 2)
    path.write_bytes(path.read_bytes()[:-64])
    assert activations.verify_store(store.directory) is None
    with pytest.raises(io.ArtifactError, match="missing or incomplete"):
        activations.ActivationStore.open(store.directory)
    rebuilt = activations.harvest(spec, ids, LAYERS, root=tmp_path)
    assert activations.verify_store(rebuilt.directory) is not None
    for layer in LAYERS:
        assert np.array_equal(np.array(rebuilt.rows(layer)), good[layer])


def test_store_without_manifest_or_index_is_not_trusted(model_dirs, tiny_tokenizer, tmp_path) -> None:
    ids = make_ids(2, len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    store = activations.harvest(str(model_dirs["llama"]), ids, [1], root=tmp_path)
    (store.directory / activations.INDEX).unlink()
    assert activations.verify_store(store.directory) is None
    (store.directory / activations.MANIFEST).write_text("{", encoding="utf-8")
    assert activations.verify_store(store.directory) is None
    assert activations.verify_store(tmp_path / "nothing-here") is None


def test_interrupted_harvest_resumes_bit_for_bit(model_dirs, tiny_tokenizer, tmp_path, monkeypatch) -> None:
    spec = str(model_dirs["llama"])
    ids = make_ids(20, len(tiny_tokenizer), tiny_tokenizer.bos_token_id, seed=3)
    clean = activations.harvest(spec, ids, LAYERS, batch_size=1, root=tmp_path / "clean")

    real_forward = activations._forward
    calls = []

    def dies_after(k: int):
        def forward(*args):
            if len(calls) == k:
                raise KeyboardInterrupt("simulated kill")
            calls.append(1)
            return real_forward(*args)
        return forward

    # Progress is committed every 16 batches: die at batch 18, so batches 16-17 are written but unrecorded.
    monkeypatch.setattr(activations, "_forward", dies_after(18))
    with pytest.raises(KeyboardInterrupt):
        activations.harvest(spec, ids, LAYERS, batch_size=1, root=tmp_path / "resumed")
    (directory,) = (d for d in (tmp_path / "resumed").iterdir() if not d.name.startswith("."))  # skip the harvest lock
    assert activations.verify_store(directory) is None
    assert io.read_json(directory / activations.PROGRESS)["seqs_done"] == 16

    calls.clear()
    monkeypatch.setattr(activations, "_forward", dies_after(10_000))
    resumed = activations.harvest(spec, ids, LAYERS, batch_size=1, root=tmp_path / "resumed")
    assert len(calls) == 4  # only sequences 16..19 were run again
    assert not (directory / activations.PROGRESS).exists()
    assert resumed.manifest == clean.manifest
    for layer in LAYERS:
        assert activations.layer_file(directory, layer).read_bytes() == \
            activations.layer_file(clean.directory, layer).read_bytes()
    assert (directory / activations.INDEX).read_bytes() == (clean.directory / activations.INDEX).read_bytes()


def test_harvest_killed_while_finishing_recovers(model_dirs, tiny_tokenizer, tmp_path, monkeypatch) -> None:
    spec = str(model_dirs["gpt2"])
    ids = make_ids(3, len(tiny_tokenizer), tiny_tokenizer.bos_token_id, seed=5)
    clean = activations.harvest(spec, ids, LAYERS, root=tmp_path / "clean")
    real_norm_factor = activations.norm_factor

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the partial files were renamed")

    monkeypatch.setattr(activations, "norm_factor", killed)
    with pytest.raises(KeyboardInterrupt):
        activations.harvest(spec, ids, LAYERS, root=tmp_path / "killed")
    monkeypatch.setattr(activations, "norm_factor", real_norm_factor)
    store = activations.harvest(spec, ids, LAYERS, root=tmp_path / "killed")
    assert store.manifest == clean.manifest
    for layer in LAYERS:
        assert np.array_equal(np.array(store.rows(layer)), np.array(clean.rows(layer)))


# -- scaling and pairing ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paired_stores(model_dirs, tiny_tokenizer, tmp_path_factory):
    """Stores of two architectures over the same sequences, with uneven positions per sequence."""
    root = tmp_path_factory.mktemp("paired-stores")
    ids = make_ids(10, len(tiny_tokenizer), tiny_tokenizer.bos_token_id, seed=4)
    positions = [torch.arange(1, 2 + (i % 5) * 2) for i in range(10)]
    store_a = activations.harvest(str(model_dirs["llama"]), ids, [1, 3], positions=positions, root=root)
    store_b = activations.harvest(str(model_dirs["gemma2"]), ids, [2], positions=positions, root=root)
    return store_a, store_b


def test_norm_factor_gives_mean_norm_sqrt_d(paired_stores) -> None:
    store_a, store_b = paired_stores
    pair = activations.PairedActivations(store_a, store_b, layer_a=3, layer_b=2)
    x_a, x_b = pair.get(np.arange(pair.n_tokens))
    assert x_a.dtype == torch.float32 and x_a.shape == (pair.n_tokens, pair.d_a)
    assert x_a.norm(dim=1).mean().item() == pytest.approx(math.sqrt(pair.d_a), rel=1e-4)
    assert x_b.norm(dim=1).mean().item() == pytest.approx(math.sqrt(pair.d_b), rel=1e-4)
    raw = as_float(store_a.rows(3))
    expected = math.sqrt(32) / raw.double().norm(dim=1).mean().item()
    assert store_a.norm_factor(3) == pytest.approx(expected, rel=1e-5)


def test_paired_eval_split_holds_out_whole_sequences_spread_over_the_corpus(paired_stores) -> None:
    store_a, store_b = paired_stores
    pair = activations.PairedActivations(store_a, store_b, layer_a=1, layer_b=2, eval_fraction=0.3,
                                         max_norm_ratio=None)
    seq_ptr = store_a.seq_ptr().tolist()
    seq_of_row = np.searchsorted(seq_ptr, np.arange(pair.n_tokens), side="right") - 1
    eval_idx = pair.eval_indices()
    train_seqs, eval_seqs = set(seq_of_row[pair.train_rows]), set(seq_of_row[eval_idx])
    assert eval_seqs == {1, 5, 8}  # 3 of 10 sequences, evenly spread, not the tail
    assert not train_seqs & eval_seqs and train_seqs | eval_seqs == set(range(10))
    assert pair.n_train + len(eval_idx) == pair.n_tokens
    thin = pair.eval_indices(max_tokens=5)
    assert len(thin) == 5 and thin[0] == eval_idx[0] and thin[-1] == eval_idx[-1]
    assert set(thin) <= set(eval_idx)


def test_eval_sequences_counts_and_spread() -> None:
    for n, frac in [(10, 0.1), (10, 0.3), (1000, 0.1), (7, 0.5), (3, 0.01)]:
        held = activations.eval_sequences(n, frac)
        assert held.sum() == max(1, round(n * frac))
    held = np.flatnonzero(activations.eval_sequences(1000, 0.1))
    assert held.min() < 10 and held.max() > 990 and set(np.diff(held)) == {10}


def test_paired_eval_keeps_at_least_one_sequence(paired_stores) -> None:
    store_a, store_b = paired_stores
    pair = activations.PairedActivations(store_a, store_b, layer_a=1, layer_b=2, eval_fraction=0.01,
                                         max_norm_ratio=None)
    seq_ptr = store_a.seq_ptr().tolist()
    held = np.flatnonzero(activations.eval_sequences(10, 0.01))
    assert len(held) == 1 and pair.n_train == pair.n_tokens - (seq_ptr[held[0] + 1] - seq_ptr[held[0]])


def test_paired_rows_with_massive_norms_are_left_out(paired_stores, tmp_path) -> None:
    import shutil
    store_a, store_b = paired_stores
    copy_dir = tmp_path / "store_b"
    shutil.copytree(store_b.directory, copy_dir)
    split = activations.PairedActivations(store_a, store_b, layer_a=1, layer_b=2, eval_fraction=0.3)
    planted = [int(split.train_rows[1]), int(split.eval_rows[-2])]  # one training row, one evaluation row
    rows = np.memmap(activations.layer_file(copy_dir, 2), dtype=np.uint16, mode="r+",
                     shape=(store_b.n_tokens, store_b.d_model))
    rows[planted] = torch.full((store_b.d_model,), 1000.0, dtype=torch.bfloat16).view(torch.int16).numpy()
    rows.flush()
    del rows
    pair = activations.PairedActivations(store_a, activations.ActivationStore.open(copy_dir), layer_a=1,
                                         layer_b=2, eval_fraction=0.3)
    assert pair.n_outliers == 2
    assert planted[0] not in pair.train_rows and planted[1] not in pair.eval_rows
    assert len(pair.train_rows) + len(pair.eval_rows) == pair.n_tokens - 2
    x_a, x_b = pair.train_batch(np.arange(pair.n_train))
    assert x_b.norm(dim=1).max().item() < 1000
    kept_all = activations.PairedActivations(store_a, activations.ActivationStore.open(copy_dir), layer_a=1,
                                             layer_b=2, eval_fraction=0.3, max_norm_ratio=None)
    assert kept_all.n_outliers == 0 and planted[0] in kept_all.train_rows


def test_pairing_refuses_stores_of_different_sizes(paired_stores, model_dirs, tiny_tokenizer, tmp_path) -> None:
    store_a, _ = paired_stores
    ids = make_ids(2, len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    other = activations.harvest(str(model_dirs["gpt2"]), ids, [1], root=tmp_path)
    with pytest.raises(io.ArtifactError, match="different numbers of rows"):
        activations.PairedActivations(store_a, other, layer_a=1, layer_b=1)
    with pytest.raises(ValueError, match="layer 2 not in store"):
        store_a.rows(2)
