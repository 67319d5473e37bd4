"""Synthetic paired activations with planted features (issue 11, "Is the ruler true?").

Two "models" A and B write a known sparse dictionary of features into their activations;
each feature is shared, A-only, B-only or analogous (in both, but rotated and/or shrunk in
one). A crosscoder trained on the pair is then scored against the plant: are the planted
features recovered (Hungarian matching on decoder cosine), are they classified right by
relative norm, and does measured sharedness track the planted sharedness?

Shapes ride on names: N tokens, F planted features, H learned latents, A/B the two widths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch

CLASSES = ("shared", "a_only", "b_only", "analogous")
PRED_CLASSES = ("a_only", "b_only", "shared")
MAGNITUDES = ("exponential", "lognormal")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_CHUNK = 8192


@dataclass
class SyntheticConfig:
    """A planted dictionary and how its features fire; validated on construction."""

    d_a: int = 96
    """Width of model A's activations."""
    d_b: int = 128
    """Width of model B's activations."""
    n_features: int = 512
    """Number of planted features F."""
    frac_shared: float = 0.5
    """Fraction of features written to both models with the same strength."""
    frac_a_only: float = 0.2
    """Fraction written to A only."""
    frac_b_only: float = 0.2
    """Fraction written to B only."""
    frac_analogous: float = 0.1
    """Fraction in both models but rotated and/or shrunk in one (see analogous_*)."""
    mean_active: float = 8.0
    """Expected number of active features per token (the marginal probabilities sum to this)."""
    freq_exponent: float = 1.0
    """Zipf exponent of the per-feature firing probability (rank^-exponent): a heavy tail."""
    max_prob: float = 0.5
    """Cap on any one feature's own firing probability."""
    n_corr_groups: int = 4
    """Groups of features that tend to fire together."""
    corr_group_size: int = 4
    """Features per correlated group."""
    group_prob: float = 0.02
    """Per-token probability that a group's joint event happens."""
    corr_prob: float = 0.8
    """Probability that each member fires when its group's event happens (on top of its own rate)."""
    n_hierarchies: int = 4
    """Parent features that have children."""
    n_children: int = 3
    """Children per parent; a child fires only on tokens where its parent fires."""
    child_prob: float = 0.5
    """Probability that a child fires given that its parent fires."""
    magnitude: str = "lognormal"
    """Distribution of an active feature's magnitude: 'exponential' or 'lognormal'."""
    mag_mean: float = 1.0
    """Mean magnitude of an active feature."""
    mag_sigma: float = 0.4
    """Log-space standard deviation (lognormal only)."""
    analogous_angle_deg: float = 30.0
    """Angle by which an analogous feature's direction is turned in `analogous_model`."""
    analogous_shrink: float = 0.7
    """Factor on an analogous feature's decoder norm in `analogous_model` (1 = not shrunk)."""
    analogous_model: str = "b"
    """The model ('a' or 'b') in which analogous features are rotated and shrunk."""
    same_basis: bool = False
    """When d_a == d_b: shared/analogous features use one direction in both models, so the
    analogous rotation shows in the A-B decoder cosine (a 'same model' pair)."""
    noise_std: float = 0.02
    """Standard deviation of isotropic Gaussian noise added to each model's activations."""
    seed: int = 0
    """Seeds the dictionary (classes, directions, rates); data get their own seed in make_pair."""

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("d_a", "d_b", "n_features"))
        _check_nonneg_ints(self, ("n_corr_groups", "corr_group_size", "n_hierarchies", "n_children"))
        fracs = [getattr(self, f"frac_{c}") for c in CLASSES]
        if any(not 0.0 <= f <= 1.0 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
            raise ValueError(f"synthetic fractions (shared, a_only, b_only, analogous) = {fracs} "
                             "must each lie in [0, 1] and sum to 1")
        roles = self.n_corr_groups * self.corr_group_size + self.n_hierarchies * (1 + self.n_children)
        if roles > self.n_features:
            raise ValueError(f"synthetic: {roles} features in groups/hierarchies exceed "
                             f"n_features={self.n_features}")
        for name in ("max_prob", "group_prob", "corr_prob", "child_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synthetic.{name}: {getattr(self, name)!r} is not in [0, 1]")
        if not 0.0 < self.mean_active < _expected_active(self, 1e9):
            raise ValueError(f"synthetic.mean_active: {self.mean_active!r} is not in "
                             f"(0, {_expected_active(self, 1e9):.3g}) for these caps")
        if self.magnitude not in MAGNITUDES:
            raise ValueError(f"synthetic.magnitude: {self.magnitude!r}; accepted: {', '.join(MAGNITUDES)}")
        if self.mag_mean <= 0 or self.mag_sigma < 0 or self.noise_std < 0 or self.freq_exponent < 0:
            raise ValueError("synthetic: mag_mean must be > 0; mag_sigma, noise_std, freq_exponent >= 0")
        if not 0.0 <= self.analogous_angle_deg <= 90.0:
            raise ValueError(f"synthetic.analogous_angle_deg: {self.analogous_angle_deg!r} is not in [0, 90]")
        if not 0.0 < self.analogous_shrink <= 1.0:
            raise ValueError(f"synthetic.analogous_shrink: {self.analogous_shrink!r} is not in (0, 1]")
        if self.analogous_model not in ("a", "b"):
            raise ValueError(f"synthetic.analogous_model: {self.analogous_model!r}; accepted: a, b")
        if self.same_basis and self.d_a != self.d_b:
            raise ValueError(f"synthetic.same_basis needs d_a == d_b, got {self.d_a} and {self.d_b}")

    def class_counts(self) -> dict[str, int]:
        """Planted features per class: fractions times F, rounded by largest remainder."""
        raw = [getattr(self, f"frac_{c}") * self.n_features for c in CLASSES]
        counts = [math.floor(r + 1e-9) for r in raw]
        order = sorted(range(len(CLASSES)), key=lambda i: counts[i] - raw[i])
        for i in order[: self.n_features - sum(counts)]:
            counts[i] += 1
        return dict(zip(CLASSES, counts))


def _check_positive_ints(cfg: SyntheticConfig, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"synthetic.{name}: {value!r} is not a positive integer")


def _check_nonneg_ints(cfg: SyntheticConfig, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"synthetic.{name}: {value!r} is not a non-negative integer")


# -- the planted dictionary ------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything about the dictionary that does not depend on the sampled tokens."""

    classes: list[str]
    D_FA: torch.Tensor
    D_FB: torch.Tensor
    own_prob_F: torch.Tensor
    """Each feature's own Bernoulli rate (0 for children, who follow their parent)."""
    freq_F: torch.Tensor
    """Marginal firing probability, all mechanisms included."""
    parent_F: torch.Tensor
    """Index of the parent feature, -1 for none."""
    groups_GS: torch.Tensor
    """Feature indices of each correlated group [G, S]."""


def _expected_active(cfg: SyntheticConfig, scale: float, rank_F: torch.Tensor | None = None) -> float:
    """Expected active features per token when own rates are min(max_prob, scale * rank^-exp)."""
    return float(_marginals(cfg, scale, rank_F)[1].sum())


def _roles(cfg: SyntheticConfig) -> tuple[int, int, int]:
    """Sizes of the role blocks: grouped members, parents, children (the rest are independent)."""
    return (cfg.n_corr_groups * cfg.corr_group_size, cfg.n_hierarchies,
            cfg.n_hierarchies * cfg.n_children)


def _marginals(cfg: SyntheticConfig, scale: float,
               rank_F: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Own rates and marginal firing probabilities, in role order (groups, parents, children, rest)."""
    F = cfg.n_features
    rank_F = torch.arange(1, F + 1, dtype=torch.float64) if rank_F is None else rank_F
    own_F = (scale * rank_F.pow(-cfg.freq_exponent)).clamp(max=cfg.max_prob)
    n_grp, n_par, n_child = _roles(cfg)
    own_F[n_grp + n_par: n_grp + n_par + n_child] = 0.0
    freq_F = own_F.clone()
    freq_F[:n_grp] = 1 - (1 - own_F[:n_grp]) * (1 - cfg.group_prob * cfg.corr_prob)
    parent_rate = own_F[n_grp: n_grp + n_par].repeat_interleave(cfg.n_children)
    freq_F[n_grp + n_par: n_grp + n_par + n_child] = parent_rate * cfg.child_prob
    return own_F, freq_F


def _solve_scale(cfg: SyntheticConfig, rank_F: torch.Tensor) -> float:
    """Bisection for the rate scale that makes the expected active count equal mean_active."""
    lo, hi = 0.0, 1.0
    while _expected_active(cfg, hi, rank_F) < cfg.mean_active:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _expected_active(cfg, mid, rank_F) < cfg.mean_active else (lo, mid)
    return 0.5 * (lo + hi)


def _unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """n random unit vectors in R^d, fp32."""
    W = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (W / W.norm(dim=1, keepdim=True)).float()


def _rotate(u_ND: torch.Tensor, angle_deg: float, gen: torch.Generator) -> torch.Tensor:
    """Turn each unit row by angle_deg towards a random unit direction orthogonal to it."""
    v_ND = torch.randn(u_ND.shape, generator=gen)
    v_ND = v_ND - (v_ND * u_ND).sum(1, keepdim=True) * u_ND
    v_ND = v_ND / v_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)
    theta = math.radians(angle_deg)
    return math.cos(theta) * u_ND + math.sin(theta) * v_ND


def _directions(cfg: SyntheticConfig, classes: list[str], gen: torch.Generator):
    """Planted decoder rows D_FA, D_FB: unit rows where a feature exists, zero rows where not."""
    F = cfg.n_features
    D_FA, D_FB = _unit_rows(F, cfg.d_a, gen), _unit_rows(F, cfg.d_b, gen)
    if cfg.same_basis:
        D_FB = D_FA.clone()
    is_ = {c: torch.tensor([k == c for k in classes]) for c in CLASSES}
    D_FA[is_["b_only"]] = 0.0
    D_FB[is_["a_only"]] = 0.0
    target = D_FA if cfg.analogous_model == "a" else D_FB
    ana = is_["analogous"]
    target[ana] = cfg.analogous_shrink * _rotate(target[ana], cfg.analogous_angle_deg, gen)
    return D_FA, D_FB


def make_plan(cfg: SyntheticConfig) -> _Plan:
    """The deterministic dictionary for cfg.seed: classes, directions, rates and structure."""
    gen = torch.Generator().manual_seed(cfg.seed)
    F = cfg.n_features
    classes = [c for c, n in cfg.class_counts().items() for _ in range(n)]
    classes = [classes[i] for i in torch.randperm(F, generator=gen).tolist()]
    rank_F = (torch.randperm(F, generator=gen) + 1).double()  # heavy tail, rank shuffled over roles
    own_F, freq_F = _marginals(cfg, _solve_scale(cfg, rank_F), rank_F)
    role_order_F = torch.randperm(F, generator=gen)  # role slot -> feature index
    n_grp, n_par, n_child = _roles(cfg)
    own_out, freq_out = torch.empty(F, dtype=torch.float64), torch.empty(F, dtype=torch.float64)
    own_out[role_order_F], freq_out[role_order_F] = own_F, freq_F
    parent_F = torch.full((F,), -1, dtype=torch.long)
    parents = role_order_F[n_grp: n_grp + n_par].repeat_interleave(cfg.n_children)
    parent_F[role_order_F[n_grp + n_par: n_grp + n_par + n_child]] = parents
    groups_GS = role_order_F[:n_grp].reshape(cfg.n_corr_groups, cfg.corr_group_size)
    D_FA, D_FB = _directions(cfg, classes, gen)
    return _Plan(classes, D_FA, D_FB, own_out.float(), freq_out.float(), parent_F, groups_GS)


# -- sampling -----------------------------------------------------------------------------------
@dataclass
class SyntheticPair:
    """Paired activations and the planted truth that produced them."""

    cfg: SyntheticConfig
    x_a: torch.Tensor
    """Model A's activations [N, d_a], fp32."""
    x_b: torch.Tensor
    """Model B's activations [N, d_b], fp32."""
    classes: list[str]
    """Class of each planted feature (one of CLASSES), length F."""
    counts: dict[str, int]
    """Planted features per class."""
    D_FA: torch.Tensor
    """Planted decoder rows in A [F, d_a] (zero rows for B-only features)."""
    D_FB: torch.Tensor
    """Planted decoder rows in B [F, d_b] (zero rows for A-only features)."""
    freq_F: torch.Tensor
    """Planted marginal firing probability of each feature."""
    parent_F: torch.Tensor
    """Parent feature of each child, -1 for none."""
    groups_GS: torch.Tensor
    """Feature indices of each correlated group."""
    acts_NF: torch.Tensor | None
    """Feature activations [N, F] (dense fp32), or None when make_pair(keep_acts=False)."""


def _sample_acts(cfg: SyntheticConfig, plan: _Plan, n_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Feature activations [n_tokens, F]: own Bernoulli rates, group events, children under parents."""
    fire_NF = torch.rand(n_tokens, cfg.n_features, generator=gen) < plan.own_prob_F
    G, S = plan.groups_GS.shape
    if G * S:
        event_NG1 = (torch.rand(n_tokens, G, 1, generator=gen) < cfg.group_prob)
        joins_NGS = event_NG1 & (torch.rand(n_tokens, G, S, generator=gen) < cfg.corr_prob)
        fire_NF[:, plan.groups_GS.reshape(-1)] |= joins_NGS.reshape(n_tokens, G * S)
    children = (plan.parent_F >= 0).nonzero().squeeze(1)
    if len(children):
        follow_NC = torch.rand(n_tokens, len(children), generator=gen) < cfg.child_prob
        fire_NF[:, children] = fire_NF[:, plan.parent_F[children]] & follow_NC
    return fire_NF.float() * _magnitudes(cfg, (n_tokens, cfg.n_features), gen)


def _magnitudes(cfg: SyntheticConfig, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Positive magnitudes with mean cfg.mag_mean from the configured distribution."""
    mag = torch.empty(shape)
    if cfg.magnitude == "exponential":
        mag.exponential_(1.0 / cfg.mag_mean, generator=gen)
    else:
        mu = math.log(cfg.mag_mean) - 0.5 * cfg.mag_sigma ** 2
        mag.log_normal_(mu, cfg.mag_sigma, generator=gen)
    return mag.clamp_min(1e-6)


def render(acts_NF: torch.Tensor, D_FA: torch.Tensor, D_FB: torch.Tensor, noise_std: float,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' activations from feature activations: acts @ D + Gaussian noise."""
    x_NA = acts_NF @ D_FA + noise_std * torch.randn(acts_NF.shape[0], D_FA.shape[1], generator=gen)
    x_NB = acts_NF @ D_FB + noise_std * torch.randn(acts_NF.shape[0], D_FB.shape[1], generator=gen)
    return x_NA, x_NB


def make_pair(cfg: SyntheticConfig, n_tokens: int, data_seed: int | None = None,
              keep_acts: bool = True) -> SyntheticPair:
    """Sample n_tokens of paired activations from cfg's planted dictionary, with the truth.

    data_seed (default: derived from cfg.seed) lets one draw fresh tokens, e.g. an evaluation
    set, from the same dictionary.
    """
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"make_pair: n_tokens={n_tokens!r} is not a positive integer")
    plan = make_plan(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 if data_seed is None else data_seed)
    xa, xb, acts = [], [], []
    for start in range(0, n_tokens, _CHUNK):
        acts_NF = _sample_acts(cfg, plan, min(_CHUNK, n_tokens - start), gen)
        x_NA, x_NB = render(acts_NF, plan.D_FA, plan.D_FB, cfg.noise_std, gen)
        xa.append(x_NA), xb.append(x_NB)
        if keep_acts:
            acts.append(acts_NF)
    return SyntheticPair(cfg=cfg, x_a=torch.cat(xa), x_b=torch.cat(xb), classes=plan.classes,
                         counts=cfg.class_counts(), D_FA=plan.D_FA, D_FB=plan.D_FB,
                         freq_F=plan.freq_F, parent_F=plan.parent_F, groups_GS=plan.groups_GS,
                         acts_NF=torch.cat(acts) if keep_acts else None)


def sweep_configs(base_cfg: SyntheticConfig, shared_fractions: Sequence[float]) -> list[SyntheticConfig]:
    """One config per shared fraction; the rest split equally between A-only and B-only."""
    out = []
    for s in shared_fractions:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"sweep_configs: shared fraction {s!r} is not in [0, 1]")
        rest = (1.0 - s) / 2
        out.append(dataclasses.replace(base_cfg, frac_shared=s, frac_a_only=rest,
                                       frac_b_only=rest, frac_analogous=0.0))
    return out
