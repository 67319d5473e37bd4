"""The synthetic validation's settings: sizes, training budget and seeds (`quick()` is a seconds-long variant)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from ..crosscoders import crosscoder
from . import synthetic as syn

ARCHITECTURES = ("relu_l1", "batchtopk", "dfc")
SHARED_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
EVAL_SEED_OFFSET = 2_000_003
"""Evaluation tokens are drawn with data_seed = synthetic seed + this (training uses make_pair's default)."""


def _default_synthetic() -> syn.SyntheticConfig:
    return syn.SyntheticConfig(n_features=256)


@dataclass
class ValidationConfig:
    """Sizes, training budget and seeds of the synthetic validation; `quick()` is a seconds-long variant."""

    synthetic: syn.SyntheticConfig = field(default_factory=_default_synthetic)
    """The planted dictionary of the recovery study; the calibration sweep varies its class fractions."""
    architectures: tuple[str, ...] = ARCHITECTURES
    """Crosscoder variants to check (names in crosscoder.ARCHITECTURES)."""
    shared_fractions: tuple[float, ...] = SHARED_FRACTIONS
    """Planted shared fractions of the calibration sweep (the rest split A-only / B-only)."""
    same_basis_architectures: tuple[str, ...] = ("relu_l1",)
    """Variants for the second, same-basis sweep (d_b = d_a, shared features in one direction)."""
    n_tokens: int = 16384
    """Training tokens per synthetic pair."""
    n_eval_tokens: int = 4096
    """Held-out tokens for mean activations (sharedness weights, live latents)."""
    dict_size: int = 512
    """Crosscoder latents H (2x the planted features by default)."""
    steps: int = 1000
    """Adam steps per crosscoder."""
    batch_size: int = 256
    """Tokens per step."""
    lr: float = 2e-3
    """Adam learning rate."""
    l1_coeff: float = 1.0
    """L1 coefficient (relu_l1 and dfc; BatchTopK ignores it)."""
    k: int = 8
    """BatchTopK's mean active latents per token (the planted mean_active by default)."""
    dead_after_tokens: int = 20_000
    """BatchTopK: tokens without firing after which a latent enters the auxiliary loss."""
    n_seeds: int = 3
    """Training seeds of the cross-seed study (seed, seed + 1, ...); at least 2."""
    n_perm: int = 20
    """Row permutations per alignment null."""
    seed: int = 0
    """Base training seed (recovery and calibration runs use it)."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "n_eval_tokens", "dict_size", "steps", "batch_size", "k",
                     "dead_after_tokens", "n_perm"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"validation.{name}: {value!r} is not a positive integer")
        if not isinstance(self.n_seeds, int) or self.n_seeds < 2:
            raise ValueError(f"validation.n_seeds: {self.n_seeds!r}; the cross-seed null needs >= 2")
        check_architectures((*self.architectures, *self.same_basis_architectures))
        check_fractions(self.shared_fractions)
        d = self.synthetic.d_a + self.synthetic.d_b
        if self.dict_size <= d:
            raise ValueError(f"validation.dict_size: {self.dict_size} must exceed d_a + d_b = {d}, "
                             "else decoder CCA is trivially 1")
        if self.lr <= 0 or self.l1_coeff < 0:
            raise ValueError(f"validation: lr={self.lr!r} must be > 0 and l1_coeff={self.l1_coeff!r} >= 0")

    @classmethod
    def quick(cls, seed: int = 0) -> "ValidationConfig":
        """A small variant (96 features, 300 steps) that runs in well under a minute."""
        small = syn.SyntheticConfig(d_a=16, d_b=24, n_features=96, mean_active=4.0, n_corr_groups=2,
                                    corr_group_size=3, n_hierarchies=2, n_children=2, seed=seed)
        return cls(synthetic=small, n_tokens=4096, n_eval_tokens=2048, dict_size=192, steps=300,
                   k=4, dead_after_tokens=10_000, n_seeds=2, n_perm=5, seed=seed)

    @classmethod
    def for_run(cls, quick: bool = False, seed: int = 0) -> "ValidationConfig":
        """The notebook's config: default or quick, with `seed` seeding both dictionary and training."""
        if quick:
            return cls.quick(seed)
        return cls(synthetic=dataclasses.replace(_default_synthetic(), seed=seed), seed=seed)

    def to_dict(self) -> dict:
        """The config as plain JSON-ready values (nested synthetic config included)."""
        return dataclasses.asdict(self)

    @property
    def seeds(self) -> tuple[int, ...]:
        """Training seeds of the cross-seed study."""
        return tuple(range(self.seed, self.seed + self.n_seeds))

    def fit_kwargs(self) -> dict:
        """The training budget as keyword arguments of recovery_study / calibration_sweep / seed_study."""
        return {"n_tokens": self.n_tokens, "n_eval_tokens": self.n_eval_tokens,
                "dict_size": self.dict_size, "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "l1_coeff": self.l1_coeff, "k": self.k,
                "dead_after_tokens": self.dead_after_tokens}

    def same_basis_synthetic(self) -> syn.SyntheticConfig:
        """The dictionary with d_b = d_a and shared features written in one direction to both models."""
        return dataclasses.replace(self.synthetic, d_b=self.synthetic.d_a, same_basis=True)


def check_architectures(names: Sequence[str]) -> None:
    unknown = [a for a in names if a not in crosscoder.ARCHITECTURES]
    if unknown or not names:
        raise ValueError(f"validation: architectures {list(names)!r} must be non-empty and from "
                         f"{', '.join(sorted(crosscoder.ARCHITECTURES))}")


def check_fractions(fractions: Sequence[float]) -> None:
    if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"validation: shared fractions {list(fractions)!r} must be non-empty, in [0, 1]")
