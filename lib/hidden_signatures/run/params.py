"""One run's parameters: a typed, validated tree of dataclasses loaded once from params/<pair>.yaml.

Every field is checked before any heavy work; an unknown key is rejected with the closest
valid name, and every error is one line naming the field, the bad value and what is accepted.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .. import precision
from ..checks import ParamsError
from ..checks import choice as _choice
from ..checks import in_range as _in_range
from ..checks import positive as _positive
from ..crosscoders.crosscoder import ARCHITECTURES
from ..crosscoders.train_config import TrainConfig
from ..data.corpus import CorpusConfig
from .params_build import LayerPair, build, parse_layers  # noqa: F401  (params.X, as before)


@dataclass
class HarvestConfig:
    """How activations are collected."""

    batch_size: int = 8
    """Sequences per forward pass."""
    max_tokens: int | None = None
    """Cap on harvested (paired) tokens; None harvests the whole crosscoder part."""
    eval_fraction: float = 0.1
    """Share of harvested sequences kept out of training for evaluation."""
    dtype: str = "auto"
    """Forward-pass dtype: auto (bf16 where the device computes it natively, else fp32), bfloat16 or float32.
    The store keeps bf16 rows either way (storage only)."""
    min_aligned_fraction: float = 0.8
    """Warn when fewer positions than this pair up across two different tokenizers."""
    align: bool = True
    """Pair positions on character offsets when the tokenizers differ; false makes that an error."""
    max_norm_ratio: float | None = 10.0
    """Leave out rows whose norm exceeds this multiple of the median (attention-sink outliers); null keeps all."""
    remote: bool = False
    """Run the forward passes on NDIF (nnsight remote execution, needs an API key): hub ids only, no local weights."""

    def __post_init__(self) -> None:
        _positive("harvest.batch_size", self.batch_size)
        if self.max_tokens is not None:
            _positive("harvest.max_tokens", self.max_tokens)
        _in_range("harvest.eval_fraction", self.eval_fraction, 0.0, 0.5, low_open=True)
        _choice("harvest.dtype", self.dtype, precision.SETTINGS)
        _in_range("harvest.min_aligned_fraction", self.min_aligned_fraction, 0.0, 1.0)
        if self.max_norm_ratio is not None:
            _in_range("harvest.max_norm_ratio", self.max_norm_ratio, 1.0, 1e6)


@dataclass
class CrosscoderSettings:
    """Architecture and size of the crosscoder (widths come from the models)."""

    dict_size: int = 4096
    """Number of latents."""
    architecture: str = "relu_l1"
    """relu_l1 (the paper's) or another registered architecture."""
    l1_coeff: float = 2.0
    """Sparsity weight lambda (paper: 2)."""
    dec_init_norm: float | None = None
    """Decoder row norm at initialisation; unset: the architecture's own (relu_l1 and dfc 0.08, the
    paper's; batchtopk 0.5)."""
    k: int = 32
    """Active latents per token for batchtopk."""
    dead_after_tokens: int = 1_000_000
    """batchtopk: a latent silent for this many training tokens is dead and joins the auxiliary
    loss (keep it well below the token ceiling, or the auxiliary loss never starts)."""
    dfc_sizes: dict = field(default_factory=dict)
    """{a_only: n, b_only: m} slots for the dedicated-feature crosscoder."""

    def __post_init__(self) -> None:
        _positive("crosscoder.dict_size", self.dict_size)
        _choice("crosscoder.architecture", self.architecture, tuple(sorted(ARCHITECTURES)))
        _in_range("crosscoder.l1_coeff", self.l1_coeff, 0.0, 1e4)
        if self.dec_init_norm is not None:  # unset: resolved by the architecture (a variant inherits "unset")
            _in_range("crosscoder.dec_init_norm", self.dec_init_norm, 0.0, 10.0, low_open=True)
        _positive("crosscoder.k", self.k)
        _positive("crosscoder.dead_after_tokens", self.dead_after_tokens)
        if self.k > self.dict_size:
            raise ParamsError(f"crosscoder.k: {self.k} exceeds crosscoder.dict_size {self.dict_size}")


@dataclass
class AnalysisConfig:
    """Thresholds for reading the decoder."""

    a_only: float = 0.9
    """n_rel above this: latent belongs to model A only."""
    b_only: float = 0.1
    """n_rel below this: latent belongs to model B only."""
    shared_low: float = 0.3
    shared_high: float = 0.7
    """n_rel in (shared_low, shared_high): shared latent."""
    eval_tokens: int = 20_000
    """Evaluation tokens for mean activations and explained variance."""
    min_fire_rate: float = 1e-3
    """A latent counts as live for alignment when it fires on at least this share of eval tokens."""
    splice_seqs: int = 8
    """Held-out sequences for splice-in fidelity (0 skips it)."""

    def __post_init__(self) -> None:
        if not 0 <= self.b_only < self.shared_low < self.shared_high < self.a_only <= 1:
            raise ParamsError("analysis: need 0 <= b_only < shared_low < shared_high < a_only <= 1, "
                              f"got {self.b_only}, {self.shared_low}, {self.shared_high}, {self.a_only}")
        _positive("analysis.eval_tokens", self.eval_tokens)
        _in_range("analysis.min_fire_rate", self.min_fire_rate, 0.0, 0.5)
        if isinstance(self.splice_seqs, bool) or not isinstance(self.splice_seqs, int) or self.splice_seqs < 0:
            raise ParamsError(f"analysis.splice_seqs: {self.splice_seqs!r} must be a non-negative integer")


@dataclass
class SeedFloorConfig:
    """Extra seeds of the main crosscoder at some layers: the seed-noise floor of every metric."""

    seeds: int = 3
    """Crosscoders per listed layer, the main one included (1 turns the floor off)."""
    at: list[str] | None = None
    """Layer labels that get the extra seeds; unset means middle, when the params file has it."""

    def __post_init__(self) -> None:
        _positive("seed_floor.seeds", self.seeds)

    def labels(self, layer_labels: list[str]) -> list[str]:
        """The labels that get extra seeds, among this params file's layer labels."""
        return [label for label in (self.at if self.at is not None else ["middle"]) if label in layer_labels]


@dataclass
class RunConfig:
    """Everything one params file sets: the pair, where to look, and how to train."""

    name: str
    """Pair name; results land in results/<name>/<layer>/."""
    model_a: str
    """Model A: packaged name, local directory or hub id."""
    model_b: str
    """Model B: same forms as model_a."""
    layers: list[LayerPair]
    """Comparison points: first / middle / last / integers, or label: [layer_a, layer_b]."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    crosscoder: CrosscoderSettings = field(default_factory=CrosscoderSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    variants: dict = field(default_factory=dict)
    """Extra crosscoders per layer label: {middle: [{architecture: batchtopk}, {seed: 1}]}."""
    seed_floor: SeedFloorConfig = field(default_factory=SeedFloorConfig)
    """Seeds 1..N-1 of the main crosscoder beside seed `train.seed`, at the listed layers."""
    train_at: dict = field(default_factory=dict)
    """Per-layer changes to `train` for every crosscoder at that layer: {first: {tokens: 300000}}."""
    finetune: dict = field(default_factory=dict)
    """Settings of a `finetune:<base>` model (lm_training.LMTrainConfig fields)."""
    distill: dict = field(default_factory=dict)
    """Settings of `distill-kl:<base>` / `distill-jacobian:<base>` students (distill.DistillConfig fields)."""
    quick: dict = field(default_factory=dict)
    """Overrides applied by --quick, e.g. {train: {tokens: 200000}}."""
    fp32_cpu: dict = field(default_factory=dict)
    """Overrides applied on a CPU without native bf16 (where `dtype: auto` means float32), to keep the
    run's time target there, e.g. {train: {tokens: 400000}, quick: {train: {tokens: 20000}}}; the run says so."""
    bf16_without_amx: dict = field(default_factory=dict)
    """Overrides applied on a CPU that computes bf16 natively but without AMX matrix tiles (AVX512-BF16
    only, e.g. AMD Zen 4), where bf16 matmuls run about 2x fp32 rather than 5x: model forwards (harvest,
    splice-in) take twice the AMX time, so e.g. {seed_floor: {seeds: 2}}; the run says so."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    relationship: str = ""
    """Which of the paper's rows this pair stands for: sanity, finetuning, distillation, scale (or empty)."""
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ParamsError(f"name: {self.name!r} must be a non-empty name without '/'")
        if not self.layers:
            raise ParamsError("layers: empty; give e.g. [first, middle, last]")
        for label, entries in self.variants.items():
            if label not in labels_of(self.layers) or not isinstance(entries, list) \
                    or not all(isinstance(e, dict) for e in entries):
                raise ParamsError(f"variants.{label}: must name a layer label ({', '.join(labels_of(self.layers))}) "
                                  "and hold a list of mappings like {architecture: batchtopk} or {seed: 1}")
        _choice("relationship", self.relationship, ("", "sanity", "finetuning", "distillation", "scale"))
        labels = labels_of(self.layers)
        if len(set(labels)) != len(labels):
            raise ParamsError(f"layers: labels repeat: {labels}")
        for label, changes in self.train_at.items():
            if label not in labels or not isinstance(changes, dict):
                raise ParamsError(f"train_at.{label}: must name a layer label ({', '.join(labels)}) and hold "
                                  "a mapping of train fields like {tokens: 300000}")
            if "seed" in changes:
                raise ParamsError(f"train_at.{label}.seed: not accepted here; other seeds are variants "
                                  "({seed: 1}) or the seed_floor")
            self.train_for(label)  # validates the merged fields by name
        for label in self.seed_floor.at or []:
            if label not in labels:
                raise ParamsError(f"seed_floor.at: {label!r} is not a layer label here; accepted: {', '.join(labels)}")
        if self.device != "auto" and not (self.device == "cpu" or self.device == "cuda"
                                          or (self.device.startswith("cuda:")
                                              and self.device[5:].isdigit())):
            raise ParamsError(f"device: {self.device!r} is not accepted; accepted: auto, cpu, cuda, cuda:N")

    def layer(self, label: str) -> LayerPair:
        """The layer pair with this label."""
        for lp in self.layers:
            if lp.label == label:
                return lp
        raise ParamsError(f"layer {label!r}: not in this params file; accepted: "
                          f"{', '.join(lp.label for lp in self.layers)}")

    def train_for(self, label: str) -> TrainConfig:
        """The training settings of the crosscoders at one layer: `train` with that layer's train_at."""
        return build(TrainConfig, {**asdict(self.train), **self.train_at.get(label, {})}, f"train_at.{label}")

    def to_dict(self) -> dict:
        return asdict(self)


def labels_of(layers: list[LayerPair]) -> list[str]:
    return [lp.label for lp in layers]


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):  # {} replaces
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


OVERLAYS = ("fp32_cpu", "bf16_without_amx")
"""Params sections merged in on one CPU class only (at most one applies), before the quick ones."""


def from_dict(data: dict, quick: bool = False, overlays: bool = True) -> RunConfig:
    """A validated RunConfig from a mapping; `quick` applies the file's own `quick` overrides.

    On a CPU without native bf16 the file's `fp32_cpu` overrides are merged in first, on one with
    bf16 but no AMX its `bf16_without_amx` ones (quick ones after); `overlays=False` skips both.
    """
    if not isinstance(data, dict):
        raise ParamsError(f"params: expected a mapping at the top level, got {type(data).__name__}")
    run = build(RunConfig, data)
    overlaid = None
    for name in OVERLAYS if overlays else ():
        overrides = getattr(run, name)
        if not overrides:
            continue
        try:  # checked on every machine, applied only where it counts
            candidate = build(RunConfig, _merge(data, overrides))
        except ParamsError as exc:
            raise ParamsError(f"{name} overrides: {exc}") from None
        if overlay_applies(run, name):
            overlaid = (_merge(data, overrides), candidate)
    if overlaid:
        data, run = overlaid
    if isinstance(run.quick, dict) and run.quick:
        try:  # a typo in the quick section is caught on every run, not only with --quick
            quick_run = build(RunConfig, _merge(data, run.quick))
        except ParamsError as exc:
            raise ParamsError(f"quick overrides: {exc}") from None
        if quick:
            return quick_run
    return run


def overlay_applies(run: RunConfig, name: str) -> bool:
    """Whether the params section `name` (one of OVERLAYS) is in force for this run's device."""
    return {"fp32_cpu": fp32_cpu_applies, "bf16_without_amx": bf16_without_amx_applies}[name](run)


def _cpu_run(run: RunConfig) -> bool:
    """True when this run computes on the CPU (device cpu, or auto without CUDA)."""
    if run.device not in ("auto", "cpu"):
        return False
    if run.device == "auto":
        import torch

        if torch.cuda.is_available():
            return False
    return True


def fp32_cpu_applies(run: RunConfig) -> bool:
    """True on a CPU run where bf16 is not native (auto precision resolves to float32)."""
    return _cpu_run(run) and precision.detect("cpu").dtype == "float32"


def bf16_without_amx_applies(run: RunConfig) -> bool:
    """True on a CPU run in bf16 on a CPU without AMX tiles (bf16 native through AVX512-BF16 only)."""
    return _cpu_run(run) and precision.detect("cpu").dtype == "bfloat16" and not precision.has_amx()


def _leaves(value, prefix: str = "") -> dict:
    """{"train.tokens": 400000, ...}: a nested mapping's leaves by dotted path."""
    if not isinstance(value, dict) or not value:
        return {prefix[:-1]: value}
    return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}


def changed_lines(plain: RunConfig, run: RunConfig) -> list[str]:
    """`train.tokens: 260000`-style lines of what `run` sets otherwise than `plain` (the same file
    loaded without its CPU-class section): what that section changes in this run, --quick or not."""
    before = _leaves(asdict(plain))
    return [f"{key}: {value}" for key, value in _leaves(asdict(run)).items()
            if before.get(key, ...) != value and key.split(".")[0] not in (*OVERLAYS, "quick")]


def load(path: str | Path, quick: bool = False, overlays: bool = True) -> RunConfig:
    """Read and validate params/<pair>.yaml (safe YAML loader only)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"params file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return from_dict(data or {}, quick=quick, overlays=overlays)


def find_params(name: str, params_dir: str | Path = "params") -> Path:
    """params/<name>.yaml for a pair name (or a path as given); clear error listing what exists."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = Path(params_dir) / f"{name}.yaml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in Path(params_dir).glob("*.yaml"))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ParamsError(f"unknown params file {name!r}: {hint}known: {', '.join(known)}")
