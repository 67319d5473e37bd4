"""Tests for params.py: the shipped params files load; every bad input gets one clear line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from hidden_signatures.run import params
from hidden_signatures.run.params import ParamsError

ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = ROOT / "params"

BASE = {
    "name": "tiny-pair",
    "model_a": "model-a-dir",
    "model_b": "model-b-dir",
    "layers": ["first", "middle", "last"],
    "train": {"tokens": 4096, "batch_size": 256},
    "quick": {"train": {"tokens": 1024}, "harvest": {"max_tokens": 500}},
}


def with_(path: str, value, base: dict | None = None) -> dict:
    """A copy of BASE with one dotted key set (value DELETE removes it)."""
    data = copy.deepcopy(base or BASE)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()


# -- good inputs -----------------------------------------------------------------------------------
def test_shipped_smollm2_same_loads(bf16_machine) -> None:
    run = params.load(PARAMS_DIR / "smollm2-same.yaml")
    assert run.name == "smollm2-same" and run.model_a == run.model_b == "smollm2-135m"
    assert [(lp.label, lp.a, lp.b) for lp in run.layers] == [("first", "first", "first"),
                                                             ("middle", "middle", "middle"),
                                                             ("last", "last", "last")]
    assert run.corpus.source == "python-docs" and run.corpus.seq_len == 256
    assert run.train.tokens == 2_400_000 and run.train.lr == 1e-3 and isinstance(run.train.lr, float)
    assert run.crosscoder.dict_size == 4096 and run.crosscoder.architecture == "relu_l1"
    assert run.harvest.max_tokens is None and run.device == "auto"


@pytest.mark.parametrize("path", sorted(PARAMS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_params_file_loads_full_and_quick(path: Path) -> None:
    full, quick = params.load(path), params.load(path, quick=True)
    assert full.name == path.stem == quick.name
    assert quick.train.tokens <= full.train.tokens


def test_quick_overrides_apply_only_with_quick() -> None:
    full = params.from_dict(BASE)
    quick = params.from_dict(BASE, quick=True)
    assert (full.train.tokens, full.harvest.max_tokens) == (4096, None)
    assert (quick.train.tokens, quick.harvest.max_tokens) == (1024, 500)
    assert quick.train.batch_size == full.train.batch_size == 256  # untouched fields keep their values
    assert BASE["train"]["tokens"] == 4096  # the input mapping is not modified


def test_layers_mapping_and_integers() -> None:
    run = params.from_dict(with_("layers", {"early": [0, 1], "deep": [-1, "last"]}))
    assert [(lp.label, lp.a, lp.b) for lp in run.layers] == [("early", 0, 1), ("deep", -1, "last")]
    assert run.layer("deep").b == "last"
    with pytest.raises(ParamsError, match="layer 'mid': not in this params file; accepted: early, deep"):
        run.layer("mid")


def test_numbers_are_converted_where_unambiguous() -> None:
    run = params.from_dict(with_("train.tokens", 1.5e6))  # YAML reads 1.5e6 as a float
    assert run.train.tokens == 1_500_000 and isinstance(run.train.tokens, int)
    assert params.from_dict(with_("train.lr", 1)).train.lr == 1.0
    assert params.from_dict(with_("harvest.max_norm_ratio", None)).harvest.max_norm_ratio is None


def test_to_dict_is_plain_data() -> None:
    data = params.from_dict(BASE).to_dict()
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert data["layers"][1] == {"label": "middle", "a": "middle", "b": "middle"}


# -- bad inputs: one clear line each ---------------------------------------------------------------------
BAD = [
    (with_("crosscoder.dict_sise", 10), "crosscoder.dict_sise: unknown key; did you mean 'dict_size'?"),
    (with_("modle_a", "x"), "modle_a: unknown key; did you mean 'model_a'?"),
    (with_("train.learning_rate", 0.1), "train.learning_rate: unknown key; "),
    (with_("model_b", DELETE), "params: missing required field 'model_b'"),
    (with_("layers", DELETE), "params: missing required field 'layers'"),
    (with_("crosscoder.dict_size", "big"), "crosscoder.dict_size: 'big' has the wrong type; expected int"),
    (with_("crosscoder.dict_size", True), "crosscoder.dict_size: True has the wrong type; expected int"),
    (with_("train.batch_size", 1.5), "train.batch_size: 1.5 has the wrong type; expected int"),
    (with_("train.lr", "fast"), "train.lr: 'fast' has the wrong type; expected float"),
    (with_("train.autocast", True), "train.autocast: replaced by train.dtype (accepted: auto, bfloat16, float32)"),
    (with_("train.dtype", "fp16"), "train.dtype: 'fp16' is not accepted; accepted: auto, bfloat16, float32"),
    (with_("harvest.dtype", "half"), "harvest.dtype: 'half' is not accepted; accepted: auto, bfloat16, float32"),
    (with_("harvest.max_tokens", "all"), "harvest.max_tokens: 'all' has the wrong type; expected int | None"),
    (with_("model_a", 7), "model_a: 7 has the wrong type; expected str"),
    (with_("harvest", 5), "harvest: expected a mapping, got int"),
    (with_("crosscoder.dict_size", 0), "crosscoder.dict_size: 0 must be a positive integer"),
    (with_("train.batch_size", -1), "train.batch_size: -1 must be a positive integer"),
    (with_("train.lr", 0), "train.lr: 0.0 must be a number in (0.0, 1.0]"),
    (with_("train.tokens", 100), "train.tokens: 100 is smaller than one batch (train.batch_size 256)"),
    (with_("train.seed", -1), "train.seed: -1 must be a non-negative integer"),
    (with_("device", "gpu"), "device: 'gpu' is not accepted; accepted: auto, cpu, cuda, cuda:N"),
    (with_("device", "cuda:x"), "device: 'cuda:x' is not accepted"),
    (with_("layers", ["first", "midle"]), "layers: 'midle' is not first, middle, last or an integer"),
    (with_("layers", [1.5]), "layers: 1.5 is not first, middle, last or an integer"),
    (with_("layers", "first"), "layers: 'first' must be a list like [first, middle, last] or a mapping"),
    (with_("layers", {"mid": [3]}), "layers.mid: [3] must be [layer_a, layer_b]"),
    (with_("layers", []), "layers: empty; give e.g. [first, middle, last]"),
    (with_("layers", ["first", "first"]), "layers: labels repeat: ['first', 'first']"),
    (with_("name", "a/b"), "name: 'a/b' must be a non-empty name without '/'"),
    (with_("corpus.seq_len", 3), "corpus.seq_len: 3 must be an integer >= 8"),
    (with_("corpus.source", "/no/such/corpus.txt"), "corpus.source: '/no/such/corpus.txt' is not python-docs"),
    (with_("harvest.eval_fraction", 0.9), "harvest.eval_fraction: 0.9 must be a number in (0.0, 0.5]"),
    (with_("harvest.eval_fraction", 0), "harvest.eval_fraction: 0.0 must be a number in (0.0, 0.5]"),
    (with_("harvest.dtype", "float16"), "harvest.dtype: 'float16' is not accepted; accepted: auto, bfloat16, float32"),
    (with_("crosscoder.architecture", "topk"), "crosscoder.architecture: 'topk' is not accepted; accepted: "),
    (with_("crosscoder.k", 10_000), "crosscoder.k: 10000 exceeds crosscoder.dict_size 4096"),
    (with_("analysis.a_only", 0.5), "analysis: need 0 <= b_only < shared_low < shared_high < a_only <= 1, "
                                    "got 0.1, 0.3, 0.7, 0.5"),
    (with_("analysis.b_only", 0.4), "analysis: need 0 <= b_only < shared_low"),
    (with_("relationship", "cousins"), "relationship: 'cousins' is not accepted; accepted: "),
    (with_("quick", 5), "quick: 5 must be a mapping"),
    (with_("seed_floor.seeds", 0), "seed_floor.seeds: 0 must be a positive integer"),
    (with_("seed_floor.at", ["midle"]), "seed_floor.at: 'midle' is not a layer label here; accepted: first, "),
    (with_("train_at", {"midle": {"tokens": 2048}}), "train_at.midle: must name a layer label (first, middle, last)"),
    (with_("train_at", {"first": 2048}), "train_at.first: must name a layer label (first, middle, last) and hold"),
    (with_("train_at", {"first": {"tokns": 2048}}), "train_at.first.tokns: unknown key; did you mean 'tokens'?"),
    (with_("train_at", {"first": {"tokens": 100}}), "train.tokens: 100 is smaller than one batch"),
    (with_("train_at", {"first": {"seed": 3}}), "train_at.first.seed: not accepted here; other seeds are variants"),
]


@pytest.mark.parametrize("data, expected", BAD, ids=[msg.split(":")[0] + f"-{i}" for i, (_, msg) in enumerate(BAD)])
def test_bad_input_gives_one_clear_line(data: dict, expected: str) -> None:
    with pytest.raises(ParamsError) as err:
        params.from_dict(data)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_architecture_error_lists_registered_variants() -> None:
    with pytest.raises(ParamsError) as err:
        params.from_dict(with_("crosscoder.architecture", "topk"))
    for name in ("relu_l1", "batchtopk"):
        assert name in str(err.value)


def test_bad_quick_override_is_caught_on_every_run() -> None:
    data = with_("quick", {"train": {"batch_size": 0}})
    for quick in (False, True):
        with pytest.raises(ParamsError, match="^quick overrides: train.batch_size: 0 must be a positive integer$"):
            params.from_dict(data, quick=quick)


def test_to_dict_round_trips() -> None:
    run = params.load(ROOT / "params" / "smollm2-same.yaml")
    assert params.from_dict(run.to_dict()) == run


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ParamsError, match="^params: expected a mapping at the top level, got list$"):
        params.from_dict([1, 2])


# -- files -------------------------------------------------------------------------------------------
def write(tmp_path: Path, text: str, name: str = "pair.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_from_yaml_text(tmp_path) -> None:
    run = params.load(write(tmp_path, yaml.safe_dump(BASE)), quick=True)
    assert run.train.tokens == 1024


def test_invalid_yaml(tmp_path) -> None:
    path = write(tmp_path, "name: x\nlayers: [first, middle\n")
    with pytest.raises(ParamsError, match=r"^params file .*pair\.yaml: not valid YAML \(") as err:
        params.load(path)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ParamsError, match=r"^params file '.*nope\.yaml' not found$"):
        params.load(tmp_path / "nope.yaml")


def test_empty_file(tmp_path) -> None:
    with pytest.raises(ParamsError, match="^params: missing required field 'name'$"):
        params.load(write(tmp_path, "# nothing here\n"))


def test_python_tags_are_refused_by_the_safe_loader(tmp_path) -> None:
    marker = tmp_path / "executed"
    text = (yaml.safe_dump(BASE) + f"description: !!python/object/apply:os.system "
            f"['touch {marker}']\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        params.load(write(tmp_path, text))
    assert not marker.exists()
    with pytest.raises(ParamsError, match="not valid YAML"):
        params.load(write(tmp_path, "name: !!python/object:builtins.dict {}\n"))


def test_find_params_by_name_and_path(tmp_path) -> None:
    assert params.find_params("smollm2-same", PARAMS_DIR) == PARAMS_DIR / "smollm2-same.yaml"
    path = write(tmp_path, yaml.safe_dump(BASE), "elsewhere.yaml")
    assert params.find_params(str(path), PARAMS_DIR) == path


def test_find_params_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ParamsError) as err:
        params.find_params("smollm2-sam", PARAMS_DIR)
    message = str(err.value)
    assert message.startswith("unknown params file 'smollm2-sam': did you mean 'smollm2-same'? known: ")
    assert "smollm2-same" in message.split("known: ")[1] and "\n" not in message
    with pytest.raises(ParamsError, match="^unknown params file 'zzz': known: "):
        params.find_params("zzz", PARAMS_DIR)


# -- comparison points ------------------------------------------------------------------------------
def points_of(data: dict, quick: bool = False) -> list[str]:
    from hidden_signatures.run import pipeline

    return [p.name for p in pipeline.points(params.from_dict(data, quick=quick))]


def test_seed_floor_adds_seeds_of_the_main_crosscoder_at_middle_by_default() -> None:
    assert points_of(BASE) == ["first", "middle", "middle-seed1", "middle-seed2", "last"]
    assert points_of(with_("seed_floor", {"seeds": 1})) == ["first", "middle", "last"]
    assert points_of(with_("seed_floor", {"seeds": 2, "at": ["first", "last"]})) == \
        ["first", "first-seed1", "middle", "last", "last-seed1"]
    assert points_of(with_("train.seed", 5)) == ["first", "middle", "middle-seed6", "middle-seed7", "last"]
    assert points_of(with_("quick.seed_floor", {"seeds": 1}), quick=True) == ["first", "middle", "last"]
    assert points_of(with_("layers", ["first", "last"])) == ["first", "last"]  # no middle: no floor


def test_seed_floor_does_not_repeat_a_seed_variant() -> None:
    data = with_("variants", {"middle": [{"architecture": "batchtopk", "k": 8}, {"seed": 2}]})
    assert points_of(data) == ["first", "middle", "middle-batchtopk", "middle-seed2", "middle-seed1", "last"]


def test_train_at_changes_the_budget_of_every_crosscoder_at_that_layer_only() -> None:
    from hidden_signatures.run import pipeline

    data = with_("train_at", {"middle": {"tokens": 2048}})
    pts = {p.name: p for p in pipeline.points(params.from_dict(data))}
    assert {n: p.train.tokens for n, p in pts.items()} == \
        {"first": 4096, "middle": 2048, "middle-seed1": 2048, "middle-seed2": 2048, "last": 4096}
    assert [pts[n].train.seed for n in ("middle", "middle-seed1", "middle-seed2")] == [0, 1, 2]
    plain = {p.name: p for p in pipeline.points(params.from_dict(BASE))}
    assert pts["first"].train == plain["first"].train  # so its training key (and cache) is unchanged
    assert pts["middle"].train != plain["middle"].train


def test_sanity_pair_gives_every_block_a_ceiling_the_rule_can_meet(bf16_machine) -> None:
    """The middle and last blocks at 4M (the rule ended them at 1.80M and 3.39M), the first and its seeds at 2.4M."""
    from hidden_signatures.run import pipeline

    run = params.load(PARAMS_DIR / "smollm2-same.yaml")
    assert {p.name: p.train.tokens for p in pipeline.points(run)} == \
        {"first": 2_400_000, "first-seed1": 2_400_000, "first-seed2": 2_400_000, "middle": 4_000_000,
         "last": 4_000_000}
    assert {p.train.target_l0 for p in pipeline.points(run)} == {64}
    assert {p.train.lr_warmup_frac for p in pipeline.points(run)} == {0.1}


def test_sanity_pair_on_a_cpu_without_native_bf16_takes_its_fp32_budget(fp32_machine) -> None:
    from hidden_signatures.run import pipeline

    run = params.load(PARAMS_DIR / "smollm2-same.yaml")
    assert {p.name: p.train.tokens for p in pipeline.points(run)} == \
        {"first": 200_000, "first-seed1": 200_000, "middle": 400_000, "last": 400_000}  # two seeds on fp32
    assert run.harvest.max_tokens == 100_000
    assert params.load(PARAMS_DIR / "smollm2-same.yaml", quick=True).train.tokens == 15_000


@pytest.mark.parametrize("machine, last", [("bf16_machine", 2_800_000), ("bf16_without_amx_machine", 2_800_000),
                                           ("fp32_machine", 700_000)])
def test_gemma_pairs_last_block_gets_the_ceiling_its_rule_needs_where_bf16_is_native(request, machine, last) -> None:
    """The rule ended the last block at 2.09M tokens with a 2.8M ceiling (bf16); the fp32 class keeps 0.7M."""
    from hidden_signatures.run import pipeline

    request.getfixturevalue(machine)
    run = params.load(PARAMS_DIR / "smollm2-gemma3.yaml")
    tokens = {p.name: p.train.tokens for p in pipeline.points(run)}
    assert tokens["last"] == last and tokens["first"] == tokens["middle"] < last


@pytest.mark.parametrize("machine", ["bf16_machine", "bf16_without_amx_machine", "fp32_machine"])
def test_every_default_crosscoder_is_left_to_the_stopping_rule_where_bf16_is_native(request, machine) -> None:
    """Where bf16 is native every default point's ceiling is at least 2.4M tokens (at 0.4M every block
    still gained 0.01 to 0.03 held-out EV over its last 20%); the fp32 class keeps its timed ceilings."""
    from hidden_signatures.run import pipeline, runner

    request.getfixturevalue(machine)
    ceilings = {(name, p.name): p.train.tokens for name in runner.default_pairs(PARAMS_DIR)
                for p in pipeline.points(params.load(PARAMS_DIR / f"{name}.yaml"))}
    assert len(ceilings) >= 20
    if machine == "fp32_machine":
        assert max(ceilings.values()) <= 700_000
    else:
        assert min(ceilings.values()) >= 2_400_000, {k: v for k, v in ceilings.items() if v < 2_400_000}


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("machine", ["bf16_machine", "bf16_without_amx_machine", "fp32_machine"])
def test_the_distillation_files_name_the_same_students(request, machine, quick) -> None:
    """distill-kl-vs-jacobian compares the very students the teacher pairs made: each student's
    recipe and text agree across the three files on every class, full run and --quick."""
    from hidden_signatures.run import derived

    request.getfixturevalue(machine)
    runs = {name: params.load(PARAMS_DIR / f"{name}.yaml", quick=quick)
            for name in ("distill-kl", "distill-jacobian", "distill-kl-vs-jacobian")}
    for kind in ("distill-kl", "distill-jacobian"):
        own, both = runs[kind], runs["distill-kl-vs-jacobian"]
        assert derived.train_config(own, kind) == derived.train_config(both, kind), (kind, quick)
        assert derived.train_corpus(own, kind) == derived.train_corpus(both, kind), (kind, quick)
