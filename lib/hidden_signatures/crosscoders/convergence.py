"""When crosscoder training stops, and how its L1 weight is steered to a target L0.

The run keeps a held-out curve (explained variance, L0 and dead share against tokens seen).
The stopping rule: held-out explained variance (mean of both models) changed by less than
`converge_gain` (up or down) over the last `converge_window` share of the tokens seen, once at least
`min_frac` of the token ceiling is behind and, with a target L0, the held-out L0 is within
L0_BAND of it. When the rule fires the learning rate decays linearly to 0 over a further
lr_decay_frac / (1 - lr_decay_frac) of the tokens seen, and training ends; a run that reaches
(1 - lr_decay_frac) of its ceiling first decays there and ends unconverged.

Everything here is a pure function of the curve and the control state, which the checkpoint
holds, so a resumed run stops at the same step as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .train_config import TrainConfig

L0_BAND = 1.25
"""With a target L0, the rule waits until held-out L0 is within a factor 1.25 of it."""
L0_STEP_CLIP = 1.0
"""The controller's per-step error, |log(L0 / target)|, is clipped here so one odd batch cannot jump."""


@dataclass
class Control:
    """The training run's steering state, saved in every checkpoint."""

    l1: float
    """The controlled L1 weight (before the warm-up factor)."""
    decay_start: int | None = None
    """Step at which the final lr decay began (None: not yet)."""
    converged: bool = False
    """True when the stopping rule, not the token ceiling, started the decay."""
    rule: dict | None = None
    """The numbers that fired the rule (or forced the decay), for the record."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Control":
        return cls(**data)


def next_l1(l1: float, batch_l0: float, target: float, rate: float) -> float:
    """One integral-control update of the L1 weight: raise it while L0 is above target, lower it below.

    log(l1) moves by rate * clip(log(L0 / target)); a batch with no active latent counts as far below.
    """
    error = math.log(max(batch_l0, 1e-3) / target)
    return l1 * math.exp(rate * max(-L0_STEP_CLIP, min(L0_STEP_CLIP, error)))


def end_step(control: Control, total: int, cfg: TrainConfig) -> int:
    """The step training ends at: the ceiling, or the end of the decay the rule started."""
    if control.decay_start is None:
        return total
    frac = cfg.lr_decay_frac
    if frac >= 1:
        return total
    return min(total, control.decay_start + math.ceil(control.decay_start * frac / (1 - frac)))


def forced_decay_step(total: int, cfg: TrainConfig) -> int:
    """The step at which an unconverged run starts its decay so that it ends at the ceiling."""
    return int(total * (1 - cfg.lr_decay_frac))


def resamples_at(step: int, control: Control, total: int, cfg: TrainConfig) -> bool:
    """Whether an evaluation at `step` may re-aim dead latents: before the final decay and through its
    first three quarters. Latents fall silent as the decay begins (measured: ~4% of a last block's)
    and again later in it (2% of a block past its midpoint); while the lr is still at least a quarter
    of its peak a re-aimed latent can still find its place."""
    if control.decay_start is None:
        return True
    return step < control.decay_start + 3 * (end_step(control, total, cfg) - control.decay_start) // 4


def lr_at(step: int, control: Control, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up over lr_warmup_frac of the ceiling, constant until the decay starts, then
    linear to 0 at end_step."""
    if control.decay_start is None or step < control.decay_start:
        warm = cfg.lr_warmup_frac * total
        return cfg.lr * min(1.0, (step + 1) / warm) if warm >= 1 else cfg.lr
    end = end_step(control, total, cfg)
    if end <= control.decay_start:
        return cfg.lr
    return cfg.lr * max(0.0, (end - step) / (end - control.decay_start))


def l1_at(step: int, control: Control, total: int, cfg: TrainConfig) -> float:
    """The L1 weight of a step: the controlled value times the linear warm-up factor."""
    warm = cfg.l1_warmup_frac * total
    factor = min(1.0, step / warm) if warm > 0 else 1.0
    return control.l1 * factor


def curve_ev(row: dict) -> float:
    """The curve's single explained-variance number: the mean over both models."""
    return 0.5 * (row["ev_a"] + row["ev_b"])


def rule_met(curve: list[dict], total_tokens: int, cfg: TrainConfig) -> dict | None:
    """The stopping rule on the held-out curve; the numbers that fired it, or None."""
    if not curve:
        return None
    last = curve[-1]
    seen = last["tokens"]
    if seen < cfg.min_frac * total_tokens:
        return None
    if cfg.target_l0 is not None and abs(math.log(max(last["l0"], 1e-3) / cfg.target_l0)) > math.log(L0_BAND):
        return None
    window = window_gain(curve, seen, cfg.converge_window)
    if window is None or abs(window["ev_gain"]) >= cfg.converge_gain:  # rising or falling: not settled
        return None
    return {"tokens": seen, "ev": curve_ev(last), "ev_gain": window["ev_gain"],
            "since_tokens": window["since_tokens"], "l0": last["l0"]}


def window_gain(curve: list[dict], seen: int, window: float) -> dict | None:
    """Held-out EV's change over the last `window` share of the curve up to `seen` tokens: its last
    row there against the last row at or before (1 - window) of that row's tokens (None: none so early)."""
    rows = [row for row in curve if row["tokens"] <= seen]
    if not rows:
        return None
    earlier = [row for row in rows if row["tokens"] <= rows[-1]["tokens"] * (1 - window)]
    if not earlier:
        return None
    return {"ev_gain": curve_ev(rows[-1]) - curve_ev(earlier[-1]), "since_tokens": earlier[-1]["tokens"],
            "tokens": rows[-1]["tokens"]}


def gain_at_stop(record: dict) -> float | None:
    """What convergence.json says of how settled training was when it stopped: the rule's own EV change
    where the rule fired, else the same change measured up to where the token ceiling's decay began
    (the decay's own rise is the lr falling, not the curve settling). None: the curve is too short."""
    if record["converged"]:
        return record["rule"]["ev_gain"]
    upto = record.get("decay_start_tokens") or record["tokens"]
    window = window_gain(record["curve"], upto, record["stopping_rule"]["converge_window"])
    return None if window is None else window["ev_gain"]


def after_eval(control: Control, curve: list[dict], step: int, total: int, cfg: TrainConfig) -> None:
    """Start the final decay if the rule fires at this held-out point."""
    if control.decay_start is not None:
        return
    fired = rule_met(curve, total * cfg.batch_size, cfg)
    if fired is not None:
        control.decay_start, control.converged, control.rule = step, True, fired


def after_step(control: Control, step: int, total: int, cfg: TrainConfig) -> None:
    """Force the decay at (1 - lr_decay_frac) of the ceiling when the rule has not fired."""
    if control.decay_start is None and step >= forced_decay_step(total, cfg):
        control.decay_start, control.converged = step, False
        control.rule = {"reason": "token ceiling", "tokens": step * cfg.batch_size}
