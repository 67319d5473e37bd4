"""The stages a params file runs, as library calls the notebooks make (one call per cell).

validate -> tokens -> harvest -> train (per layer) -> analyse (per layer). Every stage reuses
its cached result when everything that produced it is unchanged, so re-running a notebook
or `run_all.sh` costs seconds.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import io, precision
from ..crosscoders import crosscoder as cc_mod
from ..crosscoders import train as train_mod
from ..data import corpus
from ..harvest import activations
from ..models import loading as models
from ..process_group import barrier, broadcast, rank_world
from . import derived, pairing
from . import params as params_mod
from .model_info import display_name, load_tokenizer, model_report  # noqa: F401  (pipeline.X, as before)
from .pairing import PairTokens
from .params import CrosscoderSettings, ParamsError, RunConfig, TrainConfig
from .points import Point, point, points  # noqa: F401  (pipeline.X, as before)

RESULTS_ENV = "HIDDEN_SIGNATURES_RESULTS"
FIGURES_ENV = "HIDDEN_SIGNATURES_FIGURES"
METRICS_FILE = "metrics.json"
RUN_FILE = "run_config.json"


def results_root() -> Path:
    return Path(os.environ.get(RESULTS_ENV, "results"))


def figures_root() -> Path:
    return Path(os.environ.get(FIGURES_ENV, "figures"))


def layer_dir(run: RunConfig, label: str) -> Path:
    """results/<pair>/<layer>/: crosscoder, metrics and logs of one comparison point."""
    return results_root() / run.name / label


def figure_dir(run: RunConfig, label: str | None = None) -> Path:
    return figures_root() / run.name / label if label else figures_root() / run.name


# -- validation ---------------------------------------------------------------------------

@dataclass
class ResolvedLayer:
    label: str
    a: int
    b: int


def validate(run: RunConfig) -> dict[str, ResolvedLayer]:
    """Cheap checks of everything a run needs, before any heavy work; returns the layer indices."""
    for which, spec in (("model_a", run.model_a), ("model_b", run.model_b)):
        try:
            derived.check(run, spec) if derived.is_derived(spec) else models.check_spec(spec)
        except models.ModelSpecError as exc:
            raise ParamsError(f"{which}: {exc}") from None
    depth_a, _ = _shape(run, run.model_a, "model_a")
    depth_b, _ = _shape(run, run.model_b, "model_b")
    resolved = {}
    for lp in run.layers:
        try:
            resolved[lp.label] = ResolvedLayer(lp.label, models.resolve_layer(lp.a, depth_a),
                                               models.resolve_layer(lp.b, depth_b))
        except ValueError as exc:
            raise ParamsError(f"layers.{lp.label}: {exc}") from None
    try:
        models.pick_device(run.device)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    return resolved


def _shape(run: RunConfig, spec: str, which: str) -> tuple[int, int]:
    try:
        return derived.shape(run, spec) if derived.is_derived(spec) else models.model_shape(spec)
    except (models.ModelSpecError, ValueError) as exc:
        raise ParamsError(f"{which}: {exc}") from None


def load_run(params_file: str | Path, quick: bool = False, build_models: bool = False) -> RunConfig:
    """Load, validate and materialise a params file: derived models become their built directories."""
    run = params_mod.load(params_file, quick=quick)
    validate(run)
    return derived.materialize(run, build_missing=build_models)


# -- tokens -------------------------------------------------------------------------------

def pair_tokens(run: RunConfig) -> PairTokens:
    """Tokenise the crosscoder part of the corpus for both models and choose the paired positions."""
    tok_a, tok_b = load_tokenizer(run.model_a), load_tokenizer(run.model_b)
    if corpus.tokenizer_fingerprint(tok_a) == corpus.tokenizer_fingerprint(tok_b):
        ids = corpus.tokenize_part(run.corpus, tok_a, "crosscoder")
        _check_enough(run, ids.shape[0] * (ids.shape[1] - 1))
        ids = _cap_sequences(ids, run.harvest.max_tokens)
        pos = activations.all_but_first(*ids.shape)
        return PairTokens(ids, ids, pos, pos, True, 1.0)
    if not run.harvest.align:
        raise ParamsError(f"harvest.align: false, but {display_name(run.model_a)} and {display_name(run.model_b)} "
                          "have different tokenizers; set harvest.align: true to pair positions on characters")
    tokens = pairing.aligned_tokens(run, tok_a, tok_b)
    _check_enough(run, tokens.n_pairs)
    return tokens


def _check_enough(run: RunConfig, available: int) -> None:
    """harvest.max_tokens must not ask for more paired tokens than the corpus gives."""
    wanted = run.harvest.max_tokens
    if wanted is not None and wanted > available:
        raise ParamsError(f"harvest.max_tokens: {wanted} exceeds the {available} paired tokens the corpus's "
                          f"crosscoder part gives ({run.corpus.source}); lower it or use a larger corpus")


def _cap_sequences(ids_SL: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """Keep the first sequences, enough for max_tokens harvested rows (position 0 is skipped)."""
    if max_tokens is None:
        return ids_SL
    n = max(2, -(-max_tokens // (ids_SL.shape[1] - 1)))
    return ids_SL[:n]


# -- harvest ------------------------------------------------------------------------------

def harvest(run: RunConfig, tokens: PairTokens, layers: dict[str, ResolvedLayer]):
    """One harvest per model serving every layer; identical model and tokens share one store."""
    device = models.pick_device(run.device)
    dtype = harvest_dtype(run)
    store_a = activations.harvest(run.model_a, tokens.ids_a, [rl.a for rl in layers.values()],
                                  tokens.pos_a, run.harvest.batch_size, dtype, device,
                                  desc=f"{run.name} A", remote=run.harvest.remote)
    store_b = activations.harvest(run.model_b, tokens.ids_b, [rl.b for rl in layers.values()],
                                  tokens.pos_b, run.harvest.batch_size, dtype, device,
                                  desc=f"{run.name} B", remote=run.harvest.remote)
    return store_a, store_b


def harvest_dtype(run: RunConfig) -> str:
    """The forward-pass dtype of the run's harvest and splice-in: harvest.dtype with auto resolved."""
    return precision.resolve(run.harvest.dtype, models.pick_device(run.device))


def precision_record(run: RunConfig, pt: "Point", data: activations.PairedActivations) -> dict:
    """What metrics.json records of the precision: dtypes used, the sparse step's threshold and the
    machine facts behind auto."""
    device = models.pick_device(run.device)
    train = resolved_train(run, pt, data)
    return {"harvest": harvest_dtype(run), "train": train.dtype, "train_sparse_below": train.sparse_below,
            **precision.detect(device).record()}


def open_pair(run: RunConfig, name: str) -> activations.PairedActivations:
    """The paired, scaled activations of one point's layer (harvesting first if stores are missing)."""
    layers = validate(run)
    return paired(run, harvest(run, pair_tokens(run), layers), layers[point(run, name).label])


def paired(run: RunConfig, stores: tuple[activations.ActivationStore, activations.ActivationStore],
           rl: ResolvedLayer) -> activations.PairedActivations:
    """The two harvested stores read at one layer pair, with the run's eval split and outlier rule."""
    return activations.PairedActivations(*stores, rl.a, rl.b, run.harvest.eval_fraction, run.harvest.max_norm_ratio)


# -- training -----------------------------------------------------------------------------

def crosscoder_config(settings: CrosscoderSettings, data: activations.PairedActivations) -> cc_mod.CrosscoderConfig:
    s = settings
    return cc_mod.CrosscoderConfig(d_a=data.d_a, d_b=data.d_b, dict_size=s.dict_size,
                                   architecture=s.architecture, dec_init_norm=s.dec_init_norm,
                                   k=s.k, dfc_sizes=dict(s.dfc_sizes), dead_after_tokens=s.dead_after_tokens)


def resolved_train(run: RunConfig, pt: Point, data: activations.PairedActivations) -> TrainConfig:
    """The point's training settings with `dtype: auto` and `sparse_below: auto` replaced by what this
    device computes fastest (sparse_below steers only the fused ReLU+L1 step; variants keep it as given)."""
    device = models.pick_device(run.device)
    train = dataclasses.replace(pt.train, dtype=precision.resolve(pt.train.dtype, device))
    if pt.crosscoder.architecture != "relu_l1" or train.step != "fused":
        return train
    below = train_mod.resolve_sparse_below(train, data.d_a, data.d_b, pt.crosscoder.dict_size, device,
                                           rank_world()[1])  # as LossModule resolves it
    return dataclasses.replace(train, sparse_below=below)


TRAINER_VERSION = 6
"""Raised when the trainer's behaviour changes (2: stopping rule, L1 control, resampling; 3: centred
start, lr warm-up, L1 rate 0.03; 4: resampled latents start with the live second moment, up to 4%
of the dictionary per evaluation; 5: re-aiming goes on through the first half of the final decay;
6: through three quarters of it), so a crosscoder trained by an earlier version is never reused."""


def training_key(run: RunConfig, pt: Point, data: activations.PairedActivations) -> str:
    """Hash of everything that determines the trained crosscoder (the precision as resolved)."""
    return io.config_hash({"trainer": TRAINER_VERSION, "stores": [data.store_a.directory.name, data.store_b.directory.name],
                           "layers": [data.layer_a, data.layer_b], "eval_fraction": run.harvest.eval_fraction,
                           "eval_split": activations.EVAL_SPLIT,
                           "max_norm_ratio": run.harvest.max_norm_ratio, "crosscoder": asdict(pt.crosscoder),
                           "train": asdict(resolved_train(run, pt, data))})


def train_layer(run: RunConfig, name: str, data: activations.PairedActivations | None = None) -> Path:
    """Train (or reuse) the crosscoder of one point; returns results/<pair>/<name>/."""
    pt = point(run, name)
    data = data or open_pair(run, name)
    out = layer_dir(run, name)
    key = training_key(run, pt, data)
    if broadcast(_trained(out, key)):
        return out
    lead = rank_world()[0] == 0  # under torchrun only rank 0 touches results/ outside train()
    if lead:
        _clear_stale(out, key)
    model = cc_mod.build(crosscoder_config(pt.crosscoder, data), seed=pt.seed)
    train_mod.train(model, data, resolved_train(run, pt, data), pt.crosscoder.l1_coeff, out,
                    device=models.pick_device(run.device), desc=f"{run.name}/{name}")  # starts with a barrier
    if lead:
        io.write_json(out / RUN_FILE, {"training_key": key, "run": run.to_dict(),
                                       "layer_a": data.layer_a, "layer_b": data.layer_b})
    barrier()
    return out


def _trained(out: Path, key: str) -> bool:
    try:
        saved = io.read_json(out / RUN_FILE)
    except io.ArtifactError:
        return False
    if saved.get("training_key") != key:
        return False
    try:
        cc_mod.load(out)
    except (io.ArtifactError, ValueError, KeyError):
        return False
    return True


def _clear_stale(out: Path, key: str) -> None:
    """Drop a checkpoint left by a run with different settings (it must not be resumed)."""
    state = out / "checkpoint" / "key.json"
    try:
        old = io.read_json(state).get("training_key")
    except io.ArtifactError:
        old = None
    if old != key and (out / "checkpoint").exists():
        train_mod.remove_checkpoints(out / "checkpoint")
    io.write_json(state, {"training_key": key})
