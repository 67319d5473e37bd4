"""The comparison points of a run: each layer with the main settings, its variants, and the seed floor."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from .params import CrosscoderSettings, ParamsError, RunConfig, TrainConfig, labels_of
from .params import build as build_settings


@dataclass
class Point:
    """One crosscoder to train: results/<pair>/<name>/ for layer `label` with these settings."""

    name: str
    label: str
    crosscoder: CrosscoderSettings
    seed: int
    train: TrainConfig
    """The optimisation: the run's `train` with the layer's train_at, at this point's seed (dtype as set)."""
    repeat: bool = False
    """Another seed of the layer's main crosscoder (the seed floor): headline metrics only."""


def points(run: RunConfig) -> list[Point]:
    """Every crosscoder of a run: each layer with the main settings, then its variants.

    `variants: {middle: [{architecture: batchtopk}, {seed: 1}]}` adds middle-batchtopk and
    middle-seed1; a variant may set any crosscoder field and `seed`. `seed_floor` (default: 3
    seeds at middle) adds middle-seed1 and middle-seed2 after them.
    """
    out = []
    for lp in run.layers:
        out.append(Point(lp.label, lp.label, run.crosscoder, run.train.seed, run.train_for(lp.label)))
        for raw in run.variants.get(lp.label, []):
            out.append(_variant(run, lp.label, raw))
        out += _seed_floor(run, lp.label, {p.name for p in out})
    return out


def _seed_floor(run: RunConfig, label: str, taken: set[str]) -> list[Point]:
    """The seed_floor's extra seeds of the main crosscoder at this layer (unless a variant has them)."""
    if label not in run.seed_floor.labels(labels_of(run.layers)):
        return []
    extra = [_variant(run, label, {"seed": run.train.seed + i}) for i in range(1, run.seed_floor.seeds)]
    return [p for p in extra if p.name not in taken]


def _variant(run: RunConfig, label: str, raw: dict) -> Point:
    raw = dict(raw)
    seed = raw.pop("seed", run.train.seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParamsError(f"variants.{label}.seed: {seed!r} must be a non-negative integer")
    merged = {**asdict(run.crosscoder), **raw}
    settings = build_settings(CrosscoderSettings, merged, f"variants.{label}")
    parts = [label]
    if settings.architecture != run.crosscoder.architecture:
        parts.append(settings.architecture)
    if seed != run.train.seed:
        parts.append(f"seed{seed}")
    if len(parts) == 1:
        raise ParamsError(f"variants.{label}: {raw!r} changes neither the architecture nor the seed")
    train = dataclasses.replace(run.train_for(label), seed=int(seed))
    return Point("-".join(parts), label, settings, int(seed), train, repeat=settings == run.crosscoder)


def point(run: RunConfig, name: str) -> Point:
    """The point with this name; a clear error listing the others."""
    for p in points(run):
        if p.name == name:
            return p
    raise ParamsError(f"layer {name!r}: not in {run.name}; accepted: {', '.join(p.name for p in points(run))}")
