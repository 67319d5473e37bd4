"""Tests for process_group.py, run/distributed.py and the multi-process paths of activations.py and train.py.

One torchrun launch (2 CPU processes, gloo) harvests two tiny models sharded and trains on them
with DDP; its store must be byte-identical and its crosscoder equal (within float rounding) to
one process's. The remote (NDIF) harvest is tested offline through a fake server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_TEXT, save_tiny_model

from hidden_signatures import io
from hidden_signatures.crosscoders import crosscoder
from hidden_signatures.harvest import activations
from hidden_signatures.run import pipeline
from hidden_signatures import process_group as distributed
from hidden_signatures.models import loading as models
from hidden_signatures.crosscoders import train as tr
from hidden_signatures.crosscoders.crosscoder import CrosscoderConfig
from hidden_signatures.crosscoders.train_config import TrainConfig

N_SEQS, SEQ_LEN, HARVEST_BATCH = 20, 16, 3  # 7 harvest batches: the last round has one batch only
BATCH, STEPS, H = 33, 40, 64  # an odd global batch: the two ranks get 17 and 16 rows
ATOL = 1e-4
"""DDP sums per-rank gradients where one process sums over the whole batch: float rounding only, but
40 Adam steps at lr 1e-2 let a rounding-level change of a near-zero gradient move its weight by a
fraction of the lr (an AMX Xeon: 1.8e-5 at one of 2048 entries, weights up to 0.34). A wrong split or
average of the batch shows in the losses, compared to rel 1e-4 below."""
LAYER_A, LAYER_B = 2, 1

CHILD = '''
"""Under torchrun: sharded harvest, DDP training, DDP resume of a single-process checkpoint; argv: root."""
import sys
from pathlib import Path
from hidden_signatures import io
from hidden_signatures.crosscoders import crosscoder, train
from hidden_signatures.harvest import activations
from hidden_signatures import process_group as distributed
from hidden_signatures.crosscoders.train_config import TrainConfig

root = Path(sys.argv[1])
rank, world = distributed.init_from_env("cpu")
ids = io.load_tensors(root / "ids.safetensors")["ids"]
real_forward, forwards, rows_read = activations._forward, [], []


def counted_forward(*args):
    forwards.append(args[1].shape[0])
    return real_forward(*args)


class Counted:
    """The paired data, counting the rows this rank reads for training."""

    def __init__(self, data):
        self._data = data

    def train_batch(self, positions):
        rows_read.append(len(positions))
        return self._data.train_batch(positions)

    def __getattr__(self, name):
        return getattr(self._data, name)


activations._forward = counted_forward
store_a = activations.harvest(str(root / "a"), ids, [{la}], batch_size={hb}, root=root / "sharded")
store_b = activations.harvest(str(root / "b"), ids, [{lb}], batch_size={hb}, root=root / "sharded")
data = activations.PairedActivations(store_a, store_b, {la}, {lb}, eval_fraction=0.1)
cfg = TrainConfig(**io.read_json(root / "train_config.json"))


def fresh(architecture="relu_l1"):
    return crosscoder.build(crosscoder.CrosscoderConfig(d_a=data.d_a, d_b=data.d_b, dict_size={h},
                                                        architecture=architecture), seed=0)


log = train.train(fresh(), Counted(data), cfg, l1_coeff=0.5, out_dir=root / "ddp")
io.write_json(root / f"log_rank{{rank}}.json", log, digits=6)
io.write_json(root / f"work_rank{{rank}}.json", {{"forwards": forwards, "rows_read": rows_read}})
train.train(fresh(), data, cfg, l1_coeff=0.5, out_dir=root / "resumed")
train.train(fresh("batchtopk"), data, cfg, l1_coeff=0.5, out_dir=root / "batchtopk")
print(f"rank {{rank}} of {{world}} done", flush=True)
'''.format(la=LAYER_A, lb=LAYER_B, hb=HARVEST_BATCH, h=H)


def make_cfg() -> TrainConfig:
    return TrainConfig(tokens=BATCH * STEPS, batch_size=BATCH, lr=1e-2, l1_warmup_frac=0.1, lr_decay_frac=0.2,
                       checkpoint_every=10, log_every=5, seed=7, dtype="float32")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, nproc: int = 2, **env_vars: str) -> subprocess.CompletedProcess:
    """Run `torchrun ARGS` on CPU; fail the test with its output if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="", **env_vars)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


class Interrupt(Exception):
    pass


class DiesAt:
    """PairedActivations that raises when training asks for batch `step` (a killed run)."""

    def __init__(self, data, step: int):
        self._data, self._step, self.calls = data, step, 0

    def train_batch(self, positions):
        if self.calls == self._step:
            raise Interrupt(f"killed at step {self.calls}")
        self.calls += 1
        return self._data.train_batch(positions)

    def __getattr__(self, name):
        return getattr(self._data, name)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_tokenizer):
    """Models, a single-process store, reference training, then one 2-process torchrun of CHILD."""
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_model(root / "a", "llama", hidden=32, seed=1, tokenizer=tiny_tokenizer)
    save_tiny_model(root / "b", "gpt2", hidden=24, seed=2, tokenizer=tiny_tokenizer)
    ids = torch.randint(2, len(tiny_tokenizer), (N_SEQS, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = tiny_tokenizer.bos_token_id
    io.save_tensors(root / "ids.safetensors", {"ids": ids})
    cfg = make_cfg()
    io.write_json(root / "train_config.json", {k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    store_a = activations.harvest(str(root / "a"), ids, [LAYER_A], batch_size=HARVEST_BATCH, root=root / "single")
    store_b = activations.harvest(str(root / "b"), ids, [LAYER_B], batch_size=HARVEST_BATCH, root=root / "single")
    data = activations.PairedActivations(store_a, store_b, LAYER_A, LAYER_B, eval_fraction=0.1)

    def fresh() -> crosscoder.Crosscoder:
        return crosscoder.build(CrosscoderConfig(d_a=data.d_a, d_b=data.d_b, dict_size=H), seed=0)

    log = tr.train(fresh(), data, cfg, l1_coeff=0.5, out_dir=root / "reference")
    with pytest.raises(Interrupt):  # leaves a single-process checkpoint at step 20 for the DDP run to resume
        tr.train(fresh(), DiesAt(data, 23), cfg, l1_coeff=0.5, out_dir=root / "resumed")
    assert io.read_json(root / "resumed" / tr.CHECKPOINT_DIR / tr.STATE_FILE)["step"] == 20
    script = root / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    proc = torchrun(script, root)
    assert "rank 0 of 2 done" in proc.stdout and "rank 1 of 2 done" in proc.stdout
    return {"root": root, "stores": (store_a, store_b), "log": log}


def comparable(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in log]


def assert_close_weights(dir_1: Path, dir_2: Path) -> None:
    m1, m2 = crosscoder.load(dir_1), crosscoder.load(dir_2)
    for name in crosscoder.PARAM_NAMES:
        torch.testing.assert_close(getattr(m1, name), getattr(m2, name), rtol=0, atol=ATOL, msg=name)


# -- harvest ---------------------------------------------------------------------------------------
def test_sharded_harvest_is_byte_identical(launched) -> None:
    root = launched["root"]
    for single in launched["stores"]:
        sharded = root / "sharded" / single.directory.name  # same key: the same store
        assert sharded.is_dir() and activations.verify_store(sharded) is not None
        names = sorted(p.name for p in single.directory.iterdir())
        assert names == sorted(p.name for p in sharded.iterdir())
        assert activations.PROGRESS not in names and not any(n.endswith(".partial") for n in names)
        for name in names:
            assert (single.directory / name).read_bytes() == (sharded / name).read_bytes(), name
    # each model's 7 batches of 3, 3, 3, 3, 3, 3, 2 sequences: rank 0 ran batches 0, 2, 4, 6 and rank 1 1, 3, 5
    assert io.read_json(root / "work_rank0.json")["forwards"] == [3, 3, 3, 2] * 2
    assert io.read_json(root / "work_rank1.json")["forwards"] == [3, 3, 3] * 2


# -- training --------------------------------------------------------------------------------------
def test_ddp_training_equals_one_process(launched) -> None:
    root, ref_log = launched["root"], launched["log"]
    assert_close_weights(root / "reference", root / "ddp")
    assert not (root / "ddp" / tr.CHECKPOINT_DIR).exists()
    # the global batch of 33 rows is split, not repeated: rank 0 reads 17 rows a step, rank 1 16
    assert io.read_json(root / "work_rank0.json")["rows_read"] == [17] * STEPS
    assert io.read_json(root / "work_rank1.json")["rows_read"] == [16] * STEPS
    log_0, log_1, saved = (comparable(io.read_json(path)) for path in
                           (root / "log_rank0.json", root / "log_rank1.json", root / "ddp" / tr.LOG_FILE))
    assert log_0 == log_1 == saved  # every rank returns the same (global-batch) log; rank 0 wrote it
    assert [row["step"] for row in log_0] == [row["step"] for row in ref_log]
    for mine, ref in zip(log_0, ref_log):
        for key in ("loss", "mse_a", "mse_b", "l0", "dead_fraction"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), (mine["step"], key)
        for key in ("ev_a", "ev_b"):  # the row-weighted mean of the two ranks' explained variances
            assert mine[key] == pytest.approx(ref[key], abs=0.05), (mine["step"], key)


def test_ddp_resumes_a_single_process_checkpoint(launched) -> None:
    root = launched["root"]
    assert_close_weights(root / "reference", root / "resumed")
    assert not (root / "resumed" / tr.CHECKPOINT_DIR).exists()


def test_ddp_batchtopk_trains(launched) -> None:
    model = crosscoder.load(launched["root"] / "batchtopk")
    assert all(torch.isfinite(getattr(model, n)).all() for n in crosscoder.PARAM_NAMES)
    assert model.threshold.item() > 0  # the EMA threshold was estimated (and broadcast from rank 0)


def test_cli_results_are_what_the_notebooks_reuse(launched, tmp_path, monkeypatch) -> None:
    """`torchrun -m hidden_signatures.distributed PARAMS --layer middle`, then the one-process pipeline."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}. " + TINY_TEXT[i * 37: i * 37 + 900] for i in range(60)),
                      encoding="utf-8")
    params = tmp_path / "tiny-ddp.yaml"
    params.write_text(yaml.safe_dump({
        "name": "tiny-ddp", "model_a": str(launched["root"] / "a"), "model_b": str(launched["root"] / "b"),
        "layers": ["first", "middle"], "corpus": {"source": str(corpus), "seq_len": 32},
        "harvest": {"batch_size": 4}, "crosscoder": {"dict_size": 32},
        "train": {"tokens": 2048, "batch_size": 128, "checkpoint_every": 8, "log_every": 4}, "device": "cpu"}),
        encoding="utf-8")
    roots = {f"HIDDEN_SIGNATURES_{k.upper()}": str(tmp_path / k) for k in ("cache", "results", "figures")}
    torchrun("-m", "hidden_signatures.distributed", params, "--layer", "middle", **roots)
    for key, value in roots.items():
        monkeypatch.setenv(key, value)

    def refuse(*args, **kwargs):
        raise AssertionError("the one-process pipeline redid work the torchrun job had done")

    run = pipeline.load_run(params)
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(tr, "train", refuse)
    out = pipeline.train_layer(run, "middle")  # finds both stores and the trained crosscoder
    assert out == tmp_path / "results" / "tiny-ddp" / "middle" and (out / crosscoder.WEIGHTS_FILE).exists()
    assert io.read_json(out / tr.LOG_FILE)[-1]["step"] == 2048 // 128
    assert not (tmp_path / "results" / "tiny-ddp" / "first").exists()


def test_single_process_helpers_are_no_ops() -> None:
    assert not distributed.active() and distributed.rank_world() == (0, 1)
    assert distributed.init_from_env("cpu") == (0, 1)
    assert distributed.broadcast({"x": 1}) == {"x": 1}
    distributed.barrier()
    assert distributed.local_device("cpu") == torch.device("cpu")


# -- remote (NDIF) harvest -------------------------------------------------------------------------
def reference_rows(spec: str, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """hidden_states[layer] of a local forward (what NDIF would send back), [B, L, d] float32."""
    model, _ = models.load_model(spec, dtype=torch.float32)
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[layer]


@pytest.fixture
def fake_hub(tmp_path, tiny_tokenizer, monkeypatch) -> tuple[str, Path]:
    """A hub id `hs-test/tiny-llama` served from an offline hub cache under tmp_path."""
    import huggingface_hub.constants
    from nnsight.modeling import huggingface

    repo = tmp_path / "hub" / "models--hs-test--tiny-llama"
    snapshot = save_tiny_model(repo / "snapshots" / ("0" * 40), "llama", tokenizer=tiny_tokenizer)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setitem(huggingface._ID_CACHE, "hs-test/tiny-llama", "hs-test/tiny-llama")  # no hub lookup
    return "hs-test/tiny-llama", snapshot


def test_remote_harvest_runs_on_the_server_and_loads_no_weights(fake_hub, tiny_tokenizer, tmp_path,
                                                                monkeypatch) -> None:
    """A fake NDIF answers each serialised trace with a local forward's hidden states."""
    from nnsight.intervention.backends.remote import RemoteBackend

    repo_id, snapshot = fake_hub
    ids = torch.randint(2, len(tiny_tokenizer), (5, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = tiny_tokenizer.bos_token_id
    hidden = {L: reference_rows(str(snapshot), ids, L) for L in (1, 3)}
    requests = []

    def serve(self, request, tracer):
        blob = self._serialize(tracer)  # the real request body: the trace must serialise
        start = 2 * len(requests)
        requests.append((self.model_key, len(blob)))
        return {"saved": {L: hidden[L][start: start + 2] for L in (1, 3)}}

    def refuse(*args, **kwargs):
        raise AssertionError("a remote harvest loaded the model locally")

    real_remote_model, built = activations._remote_model, []
    monkeypatch.setattr(activations, "_remote_model", lambda spec: built.append(real_remote_model(spec)) or built[0])
    monkeypatch.setattr(RemoteBackend, "request", serve)
    monkeypatch.setattr(models, "load_model", refuse)
    store = activations.harvest(repo_id, ids, [3, 1], batch_size=2, root=tmp_path / "stores", remote=True)
    (traced,) = built
    assert not traced.nn_model.dispatched and traced.remote is True
    assert {p.device.type for p in traced.nn_model._module.parameters()} == {"meta"}  # no weights here
    assert len(requests) == 3 and all('"repo_id": "hs-test/tiny-llama"' in key for key, _ in requests)
    assert all(size > 0 for _, size in requests)
    for L in (1, 3):
        expected = hidden[L][:, 1:].reshape(-1, 32).to(torch.bfloat16).float()
        assert torch.equal(activations.to_float(np.array(store.rows(L))), expected)
    local_key = activations.store_key(repo_id, ids, activations.all_but_first(*ids.shape), [1, 3], "bfloat16")
    assert store.directory.name != local_key  # a remote store never stands in for a local one


def test_remote_harvest_refuses_local_models(tiny_llama_dir, tmp_path) -> None:
    ids = torch.zeros(2, SEQ_LEN, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^harvest.remote: model .* is a packaged name or a local directory"):
        activations.harvest(str(tiny_llama_dir), ids, [1], root=tmp_path, remote=True)
    with pytest.raises(ValueError, match="harvest.remote"):
        activations.harvest("smollm2-135m", ids, [1], root=tmp_path, remote=True)


def test_simulated_remote_harvest_equals_local(tiny_llama_dir, tiny_tokenizer, tmp_path) -> None:
    """nnsight's remote="local" serialises each trace as for NDIF and runs it here: same store bytes."""
    ids = torch.randint(2, len(tiny_tokenizer), (5, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = tiny_tokenizer.bos_token_id
    local = activations.harvest(str(tiny_llama_dir), ids, [0, 2], batch_size=2, root=tmp_path / "local")
    simulated = activations.harvest(str(tiny_llama_dir), ids, [0, 2], batch_size=2, root=tmp_path / "sim",
                                    remote="local")
    for L in (0, 2):
        assert activations.layer_file(local.directory, L).read_bytes() == \
            activations.layer_file(simulated.directory, L).read_bytes()
