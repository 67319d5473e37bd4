"""Reliability (issue 9): a killed run costs at most the work since its last checkpoint, damaged or
untrusted files are rebuilt or refused (never trusted, never unpickled), and bad inputs stop a run
with one clear line before any heavy work.

Cases already covered elsewhere are not repeated here: NaN in the crosscoder data (test_train),
NaN in the fine-tuning loss (test_finetune), a pickle renamed to crosscoder.safetensors
(test_crosscoder), YAML python tags (test_params), a truncated layer file (test_activations).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, save_tiny_model

from hidden_signatures import io
from hidden_signatures.crosscoders import crosscoder
from hidden_signatures.harvest import activations
from hidden_signatures.run import params, pipeline, runner
from hidden_signatures.models import loading as models
from hidden_signatures.crosscoders import train as tr
from hidden_signatures.run.params import ParamsError, TrainConfig

N_SEQS, SEQ_LEN = 64, 16
LAYER_A, LAYER_B = 2, 1
BATCH, STEPS, EVERY, DICT = 32, 60, 10, 64
STEP_DELAY, HARVEST_DELAY = 0.03, 0.02  # seconds a throttled child waits per step / per forward
TIMEOUT = 120.0
RESEND_AFTER = 0.8  # s: a child still running this long after a signal missed it; send it again


# -- shared inputs ---------------------------------------------------------------------------------
def random_ids(vocab: int, bos: int, n_seqs: int = N_SEQS, seed: int = 0) -> torch.Tensor:
    """Seeded random token sequences [S, SEQ_LEN], each starting with BOS."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n_seqs, SEQ_LEN), generator=gen)
    ids[:, 0] = bos
    return ids


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer) -> dict:
    """Two tiny models (Llama d 32, GPT-2 d 24), their token ids and their stores in one shared cache dir."""
    root = tmp_path_factory.mktemp("reliability")
    dir_a = save_tiny_model(root / "a", "llama", hidden=32, seed=1, tokenizer=tiny_tokenizer)
    dir_b = save_tiny_model(root / "b", "gpt2", hidden=24, seed=2, tokenizer=tiny_tokenizer)
    ids = random_ids(len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    io.save_tensors(root / "ids.safetensors", {"ids": ids})
    store_a = activations.harvest(str(dir_a), ids, [LAYER_A], root=root / "stores")
    store_b = activations.harvest(str(dir_b), ids, [LAYER_B], root=root / "stores")
    return {"root": root, "dir_a": dir_a, "dir_b": dir_b, "ids": ids, "ids_file": root / "ids.safetensors",
            "store_a": store_a.directory, "store_b": store_b.directory}


def open_pair(inputs: dict) -> activations.PairedActivations:
    """The paired, scaled rows of the fixture's two stores."""
    return activations.PairedActivations(activations.ActivationStore.open(inputs["store_a"]),
                                         activations.ActivationStore.open(inputs["store_b"]),
                                         layer_a=LAYER_A, layer_b=LAYER_B)


def train_cfg() -> TrainConfig:
    """The training settings the child script uses (60 steps, a checkpoint every 10)."""
    return TrainConfig(tokens=BATCH * STEPS, batch_size=BATCH, lr=1e-2, l1_warmup_frac=0.1,
                       checkpoint_every=EVERY, log_every=5, seed=3)


def without_seconds(log: list[dict]) -> list[dict]:
    """Log rows minus wall-clock time (the only field allowed to differ between runs)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in log]


# -- child processes -------------------------------------------------------------------------------
TRAIN_SCRIPT = '''
"""Train a crosscoder on two stores; argv: store_a store_b out_dir delay. Prints the batches it ran."""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started with SIGINT ignored
from hidden_signatures.crosscoders import crosscoder, train
from hidden_signatures.harvest import activations
from hidden_signatures.crosscoders.train_config import TrainConfig

store_a, store_b, out_dir, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
data = activations.PairedActivations(activations.ActivationStore.open(store_a),
                                     activations.ActivationStore.open(store_b), layer_a={la}, layer_b={lb})


class Throttled:
    """The same rows, handed out `delay` seconds late, so the parent can kill between checkpoints."""

    def __init__(self, data):
        self._data, self.calls = data, 0

    def train_batch(self, positions):
        time.sleep(delay)
        self.calls += 1
        return self._data.train_batch(positions)

    def __getattr__(self, name):
        return getattr(self._data, name)


cfg = TrainConfig(tokens={tokens}, batch_size={batch}, lr=1e-2, l1_warmup_frac=0.1, checkpoint_every={every},
                  log_every=5, seed=3)
model = crosscoder.build(crosscoder.CrosscoderConfig(d_a=data.d_a, d_b=data.d_b, dict_size={dict_size}), seed=0)
throttled = Throttled(data)
train.train(model, throttled, cfg, l1_coeff=0.5, out_dir=out_dir)
print(f"batches {{throttled.calls}}", flush=True)
'''.format(la=LAYER_A, lb=LAYER_B, tokens=BATCH * STEPS, batch=BATCH, every=EVERY, dict_size=DICT)

HARVEST_SCRIPT = '''
"""Harvest layers 1 and 3 of one model, one sequence per batch; argv: spec ids_file root delay."""
import sys, time
from pathlib import Path
from hidden_signatures import io
from hidden_signatures.harvest import activations

spec, ids_file, root, delay = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
ids = io.load_tensors(ids_file)["ids"]
real_forward, calls = activations._forward, []


def throttled_forward(*args):
    """The real forward pass, `delay` seconds late, so the parent can kill between progress commits."""
    time.sleep(delay)
    calls.append(1)
    return real_forward(*args)


activations._forward = throttled_forward
store = activations.harvest(spec, ids, [1, 3], batch_size=1, root=root)
print(f"forwards {len(calls)}", flush=True)
print(store.directory, flush=True)
'''


def child_env() -> dict[str, str]:
    """Environment of a child process: offline, one thread unless the caller set otherwise."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def script(tmp_path: Path, name: str, text: str) -> Path:
    """Write a child script into tmp_path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_child(path: Path, *args) -> subprocess.CompletedProcess:
    """Run a child script to completion; fail the test with its output if it fails."""
    proc = subprocess.run([sys.executable, str(path), *map(str, args)], env=child_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def interrupt_child(path: Path, args: list, ready: Path, sig: signal.Signals, linger: float) -> int:
    """Start a child, wait until `ready` exists, wait `linger` s more, send `sig` (again while it runs
    on); its return code. A child that ends with 0 all the same fails the test, showing its output."""
    proc = subprocess.Popen([sys.executable, str(path), *map(str, args)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            assert proc.poll() is None, "child ended before its first checkpoint: " + proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"{ready} never appeared"
            time.sleep(0.005)
        time.sleep(linger)
        assert proc.poll() is None, "child finished before it could be interrupted; raise the delay"
        proc.send_signal(sig)
        sent = 1
        while True:  # communicate drains the pipes while it waits; it may be called again after a timeout
            try:
                out, err = proc.communicate(timeout=RESEND_AFTER)
                break
            except subprocess.TimeoutExpired:  # a SIGINT that lands inside a __del__ is ignored by Python
                assert time.monotonic() < deadline, f"child still running at its {TIMEOUT} s deadline after {sig.name}"
                proc.send_signal(sig)
                sent += 1
        assert proc.returncode != 0, (f"child ended with 0 after {sent} x {sig.name}:\n"
                                      f"{out[-2000:]}\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


# -- 1. crosscoder training killed and resumed -----------------------------------------------------------
@pytest.fixture(scope="module")
def reference_training(inputs, tmp_path_factory) -> Path:
    """An uninterrupted training run in a child process (no throttle)."""
    tmp = tmp_path_factory.mktemp("reference-training")
    out = tmp / "out"
    run_child(script(tmp, "train_child.py", TRAIN_SCRIPT), inputs["store_a"], inputs["store_b"], out, 0)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_training_resumes_from_its_checkpoint_bit_for_bit(sig, inputs, reference_training, tmp_path) -> None:
    path = script(tmp_path, "train_child.py", TRAIN_SCRIPT)
    out = tmp_path / "out"
    args = [inputs["store_a"], inputs["store_b"], out, STEP_DELAY]
    state_file = out / tr.CHECKPOINT_DIR / tr.STATE_FILE
    code = interrupt_child(path, args, state_file, sig, linger=4 * STEP_DELAY)
    assert code != 0
    assert not (out / crosscoder.WEIGHTS_FILE).exists()  # the run really was cut short
    saved_step = io.read_json(state_file)["step"]
    assert saved_step % EVERY == 0 and 0 < saved_step < STEPS

    proc = run_child(path, *args)
    assert f"resuming from step {saved_step}" in proc.stdout
    assert f"batches {STEPS - saved_step}" in proc.stdout  # lost: only the steps after the checkpoint
    got = io.load_tensors(out / crosscoder.WEIGHTS_FILE)
    want = io.load_tensors(reference_training / crosscoder.WEIGHTS_FILE)
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert without_seconds(io.read_json(out / tr.LOG_FILE)) == \
        without_seconds(io.read_json(reference_training / tr.LOG_FILE))
    assert not (out / tr.CHECKPOINT_DIR).exists()


class Counted:
    """PairedActivations that counts the training batches it hands out."""

    def __init__(self, data):
        self._data, self.calls = data, 0

    def train_batch(self, positions):
        self.calls += 1
        return self._data.train_batch(positions)

    def __getattr__(self, name):
        return getattr(self._data, name)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(inputs, tmp_path, monkeypatch, capsys) -> None:
    data = open_pair(inputs)
    real_save, optimizer_saves = io.save_tensors, []

    def dies_on_second_optimizer_save(path, tensors, metadata=None):
        if Path(path).name == tr.OPTIMIZER_FILE:
            optimizer_saves.append(path)
            if len(optimizer_saves) == 2:  # checkpoint at step 20: weights already written
                raise KeyboardInterrupt("killed while writing the checkpoint of step 20")
        return real_save(path, tensors, metadata)

    def model():
        return crosscoder.build(crosscoder.CrosscoderConfig(d_a=data.d_a, d_b=data.d_b, dict_size=DICT), 0)

    monkeypatch.setattr(io, "save_tensors", dies_on_second_optimizer_save)
    with pytest.raises(KeyboardInterrupt):
        tr.train(model(), data, train_cfg(), l1_coeff=0.5, out_dir=tmp_path)
    monkeypatch.setattr(io, "save_tensors", real_save)
    assert io.read_json(tmp_path / tr.CHECKPOINT_DIR / tr.STATE_FILE)["step"] == EVERY
    capsys.readouterr()
    counted = Counted(data)
    tr.train(model(), counted, train_cfg(), l1_coeff=0.5, out_dir=tmp_path)
    assert f"resuming from step {EVERY}" in capsys.readouterr().out
    assert counted.calls == STEPS - EVERY


# -- 2. harvest killed and resumed ---------------------------------------------------------------------
def test_killed_harvest_resumes_to_identical_bytes(inputs, tmp_path) -> None:
    path = script(tmp_path, "harvest_child.py", HARVEST_SCRIPT)
    spec = str(inputs["dir_a"])
    clean = run_child(path, spec, inputs["ids_file"], tmp_path / "clean", 0)
    clean_dir = Path(clean.stdout.strip().splitlines()[-1])
    key = clean_dir.name
    killed_dir = tmp_path / "killed" / key
    code = interrupt_child(path, [spec, inputs["ids_file"], tmp_path / "killed", HARVEST_DELAY],
                           killed_dir / activations.PROGRESS, signal.SIGKILL, linger=5 * HARVEST_DELAY)
    assert code == -signal.SIGKILL
    assert activations.verify_store(killed_dir) is None
    done = io.read_json(killed_dir / activations.PROGRESS)["seqs_done"]
    assert done % 16 == 0 and 0 < done < N_SEQS

    resumed = run_child(path, spec, inputs["ids_file"], tmp_path / "killed", 0)
    assert f"forwards {N_SEQS - done}" in resumed.stdout  # only the unrecorded sequences ran again
    assert Path(resumed.stdout.strip().splitlines()[-1]) == killed_dir
    assert not (killed_dir / activations.PROGRESS).exists()
    for name in ("layer_1.bin", "layer_3.bin", activations.INDEX, activations.MANIFEST):
        assert (killed_dir / name).read_bytes() == (clean_dir / name).read_bytes(), name


# -- 3. damaged artifacts are not trusted ----------------------------------------------------------
def tiny_run(inputs: dict, text_file: Path, **overrides) -> params.RunConfig:
    """A RunConfig over the two tiny models, one comparison point `mid` (blocks 2 and 1)."""
    data = {"name": "reliability", "model_a": str(inputs["dir_a"]), "model_b": str(inputs["dir_b"]),
            "layers": {"mid": [LAYER_A, LAYER_B]}, "corpus": {"source": str(text_file), "seq_len": SEQ_LEN},
            "crosscoder": {"dict_size": 32}, "device": "cpu",
            "train": {"tokens": 16 * BATCH, "batch_size": BATCH, "checkpoint_every": 4, "log_every": 4}}
    data.update(overrides)
    return params.from_dict(data)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-16])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _pickled(path: Path) -> None:
    """A real torch checkpoint under the safetensors name (written aside first: the tensors map the file)."""
    pickled = path.with_suffix(".pt")
    torch.save(io.load_tensors(path), pickled)
    os.replace(pickled, path)


@pytest.mark.parametrize("damage", [_truncate, _empty, _pickled])
def test_damaged_crosscoder_in_results_is_retrained(damage, inputs, text_file, isolated_roots, monkeypatch) -> None:
    run, data = tiny_run(inputs, text_file), open_pair(inputs)
    out = pipeline.train_layer(run, "mid", data)
    weights = out / crosscoder.WEIGHTS_FILE
    good = weights.read_bytes()
    key = pipeline.training_key(run, pipeline.point(run, "mid"), data)
    assert pipeline._trained(out, key)
    damage(weights)

    def never(*args, **kwargs):
        pytest.fail("a crosscoder file was unpickled")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    assert not pipeline._trained(out, key)
    assert pipeline.train_layer(run, "mid", data) == out
    assert weights.read_bytes() == good  # retrained from scratch to the same bytes
    assert pipeline._trained(out, key)


def _wrong_n_tokens(m: dict) -> None:
    m["n_tokens"] += 1


def _wrong_width(m: dict) -> None:
    m["d_model"] -= 1


def _incomplete(m: dict) -> None:
    m["complete"] = False


def _old_version(m: dict) -> None:
    m["version"] = activations.STORE_VERSION + 1


def _extra_layer(m: dict) -> None:
    m["layers"] = m["layers"] + [3]  # a layer whose file does not exist


@pytest.mark.parametrize("tamper", [_wrong_n_tokens, _wrong_width, _incomplete, _old_version, _extra_layer])
def test_inconsistent_manifest_is_not_trusted_and_the_store_is_rebuilt(tamper, inputs, tmp_path) -> None:
    source = inputs["store_a"]
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    manifest = io.read_json(copy / activations.MANIFEST)
    tamper(manifest)
    io.write_json(copy / activations.MANIFEST, manifest)
    assert activations.verify_store(copy) is None
    with pytest.raises(io.ArtifactError, match="missing or incomplete"):
        activations.ActivationStore.open(copy)
    rebuilt = activations.harvest(str(inputs["dir_a"]), inputs["ids"], [LAYER_A], root=tmp_path)
    assert rebuilt.directory == copy
    for name in (activations.MANIFEST, activations.INDEX, f"layer_{LAYER_A}.bin"):
        assert (copy / name).read_bytes() == (source / name).read_bytes(), name


# -- 5. models: no remote code, safetensors only ---------------------------------------------------------
def test_models_load_without_remote_code_and_from_safetensors_only(inputs, monkeypatch) -> None:
    import transformers

    calls: dict[str, list[dict]] = {}
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        def recorder(*args, _real=cls.from_pretrained, _name=cls.__name__, **kwargs):
            calls.setdefault(_name, []).append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recorder)
    spec = str(inputs["dir_a"])
    models.load_model(spec)
    models.read_config(spec)
    pipeline.load_tokenizer(spec)
    assert set(calls) == {"AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"}
    (model_kwargs,) = calls["AutoModelForCausalLM"]
    assert model_kwargs["trust_remote_code"] is False and model_kwargs["use_safetensors"] is True
    for name, kwargs_list in calls.items():
        for kwargs in kwargs_list:
            assert kwargs.get("trust_remote_code") is False, (name, kwargs)


def test_model_dir_with_only_pickled_weights_is_refused_unread(inputs, tmp_path, monkeypatch) -> None:
    shutil.copytree(inputs["dir_a"], tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    torch.save(io.load_tensors(weights), tmp_path / "m" / "pytorch_model.bin")
    weights.unlink()

    def never(*args, **kwargs):
        pytest.fail("pickled weights were loaded")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(models.ModelSpecError, match=r"^model .*: cannot load") as err:
        models.load_model(str(tmp_path / "m"))
    assert "\n" not in str(err.value)


# -- 7. bad inputs: one line from validation, exit code 2 from the runner ----------------------------------
def _unknown_packaged(inputs, tmp_path):
    return {"model_a": "smollm3-135m"}, ["model_a: ", "'smollm3-135m'", "smollm2-135m", "offline"]


def _layer_out_of_range(inputs, tmp_path):
    return {"layers": [40]}, ["layers.40: ", "40", "4 blocks", "0..3"]


def _missing_corpus(inputs, tmp_path):
    missing = tmp_path / "no-such-corpus.txt"
    return {"corpus": {"source": str(missing), "seq_len": SEQ_LEN}}, ["corpus.source: ", str(missing)]


def _corpus_dir_without_text(inputs, tmp_path):
    folder = tmp_path / "pdfs"
    folder.mkdir()
    (folder / "paper.pdf").write_bytes(b"%PDF-1.4")
    return {"corpus": {"source": str(folder), "seq_len": SEQ_LEN}}, [str(folder), "no .txt or .md files"]


@pytest.mark.parametrize("case", [_unknown_packaged, _layer_out_of_range, _missing_corpus, _corpus_dir_without_text])
def test_bad_params_stop_with_one_line(case, inputs, text_file, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides, needles = case(inputs, tmp_path)
    data = {"name": "bad", "model_a": str(inputs["dir_a"]), "model_b": str(inputs["dir_b"]),
            "layers": ["middle"], "corpus": {"source": str(text_file), "seq_len": SEQ_LEN}, **overrides}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ParamsError) as err:
        pipeline.validate(params.load(path))
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    capsys.readouterr()
    assert runner.main([str(path), "--params-dir", str(tmp_path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr == f"error: {message}\n"


def test_runner_rejects_a_bad_allocator_setting_before_any_work(capsys, monkeypatch) -> None:
    monkeypatch.setenv("HIDDEN_SIGNATURES_MALLOC", "jemalloc")
    monkeypatch.setattr(runner, "plan", lambda paths, quick: [])  # the params are not what is tested here
    monkeypatch.setattr(runner, "run_tasks", lambda *a, **k: pytest.fail("ran tasks despite the bad setting"))
    assert runner.main(["smollm2-same", "--params-dir", str(ROOT / "params")]) == 2
    assert capsys.readouterr().err == ("error: HIDDEN_SIGNATURES_MALLOC='jemalloc': accepted: retain, default "
                                       "(or unset)\n")


def test_runner_unknown_params_file_suggests_the_closest(capsys) -> None:
    assert runner.main(["smollm2-sam", "--params-dir", str(ROOT / "params")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: unknown params file 'smollm2-sam': did you mean 'smollm2-same'? known: ")


def test_runner_cli_unknown_params_file_exits_2_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "hidden_signatures.runner", "no-such-pair"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: unknown params file 'no-such-pair': ")
    known = line.split("known: ")[1].split(", ")
    assert "smollm2-same" in known and known == sorted(known)
    assert proc.stdout == ""


def test_quick_runs_write_beside_full_results_not_over_them(monkeypatch) -> None:
    from hidden_signatures.run import pipeline

    for env in (pipeline.RESULTS_ENV, pipeline.FIGURES_ENV):
        monkeypatch.setenv(env, "x")  # recorded, so the values quick_roots sets are undone afterwards
        monkeypatch.delenv(env)
    runner.quick_roots(False)
    assert pipeline.results_root() == Path("results") and pipeline.figures_root() == Path("figures")
    runner.quick_roots(True)
    assert pipeline.results_root() == Path("results-quick") and pipeline.figures_root() == Path("figures-quick")
    monkeypatch.setenv(pipeline.RESULTS_ENV, "/elsewhere")
    runner.quick_roots(True)  # a root the user set is kept
    assert pipeline.results_root() == Path("/elsewhere")
