"""The crosscoder trainer's settings (`train:` in a params file), kept beside the trainer that reads them."""

from __future__ import annotations

from dataclasses import dataclass

from .. import precision
from ..checks import ParamsError, choice, in_range, positive
from . import sparse_probe

STEPS = ("fused", "autograd")


@dataclass
class TrainConfig:
    """The crosscoder's optimisation."""

    tokens: int = 1_500_000
    """Token ceiling: training stops here if the stopping rule has not stopped it before (the store
    is cycled in a fresh seeded order each epoch)."""
    batch_size: int = 1024
    """Tokens per step."""
    lr: float = 1e-3
    """Adam learning rate (paper: 5e-5 over 200M tokens; short runs need more)."""
    beta1: float = 0.9
    beta2: float = 0.999
    lr_warmup_frac: float = 0.0
    """Share of the ceiling's steps over which the lr rises linearly to lr (0: none). Adam's first steps
    move every weight by about lr whatever its gradient's size; a warm-up keeps them from silencing
    latents for good before the dictionary has formed."""
    l1_warmup_frac: float = 0.05
    """Share of steps over which the L1 weight rises linearly from 0."""
    lr_decay_frac: float = 0.2
    """Share of final steps over which the learning rate decays linearly to 0."""
    checkpoint_every: int = 200
    """Steps between checkpoints (resume point)."""
    log_every: int = 25
    """Steps between log rows."""
    dtype: str = "auto"
    """Matmul precision: auto (bf16 autocast where the device computes bf16 natively, else fp32),
    bfloat16 (autocast, fp32 master weights) or float32."""
    step: str = "fused"
    """How the ReLU+L1 crosscoder's step is computed: fused (a hand-written forward and backward,
    dense or, below train.sparse_below, over the fired latents only) or autograd (through
    Crosscoder.loss). Variants (batchtopk, dfc) always use autograd."""
    sparse_below: float | str = sparse_probe.AUTO
    """A batch whose share of active (token, latent) pairs is below this takes the sparse step
    (0 never, 1 always); auto: where the sparse step is measured to pay on this machine, at the
    run's shape and precision (sparse_probe.py, cached; README, Speed)."""
    target_l0: int | None = None
    """Steer the L1 weight during training so the batch L0 settles here (crosscoder.l1_coeff is the
    starting value); None keeps the L1 weight fixed after its warm-up. BatchTopK's L0 is its k."""
    l1_rate: float = 0.03
    """Integral gain of the L1 controller: log(l1) moves by up to this much per step."""
    eval_every: int = 0
    """Steps between held-out evaluations for the convergence curve (0: a 25th of the ceiling, at least 10)."""
    eval_tokens: int = 8192
    """Held-out tokens per evaluation of the convergence curve."""
    converge_gain: float = 0.005
    """Stopping rule: held-out explained variance gained less than this over the last converge_window."""
    converge_window: float = 0.2
    """Share of the tokens seen over which the stopping rule measures the gain."""
    min_frac: float = 0.25
    """Share of the token ceiling trained before the stopping rule is checked."""
    resample: bool = True
    """Resample dead latents (ReLU+L1 crosscoder) at every held-out evaluation before the final decay."""
    centre_init: bool = True
    """Start the decoder biases at the training rows' mean and the encoder bias so that every latent's
    pre-activation is centred: on an uncentred residual stream a zero-bias start leaves the latents
    that point away from the mean silent from the first step (the last blocks' dead latents)."""
    resample_max: float = 0.04
    """At most this share of the dictionary is resampled at one evaluation. 4% brings a last block
    back from a few hundred latents silenced together (SmolLM2's last block at lr 1e-3: 0.3% dead at
    the end against 14.5% with 1%); re-aiming thousands at once, before the bias start and the
    moments of resample.py, swung the last layers' held-out explained variance to -400."""
    seed: int = 0

    def eval_interval(self) -> int:
        """Steps between held-out evaluations."""
        return self.eval_every or max(10, (self.tokens // self.batch_size) // 25)

    def __post_init__(self) -> None:
        positive("train.tokens", self.tokens)
        positive("train.batch_size", self.batch_size)
        if self.tokens < self.batch_size:
            raise ParamsError(f"train.tokens: {self.tokens} is smaller than one batch "
                              f"(train.batch_size {self.batch_size})")
        in_range("train.lr", self.lr, 0.0, 1.0, low_open=True)
        in_range("train.beta1", self.beta1, 0.0, 1.0)
        in_range("train.beta2", self.beta2, 0.0, 1.0)
        in_range("train.lr_warmup_frac", self.lr_warmup_frac, 0.0, 1.0)
        in_range("train.l1_warmup_frac", self.l1_warmup_frac, 0.0, 1.0)
        in_range("train.lr_decay_frac", self.lr_decay_frac, 0.0, 1.0)
        positive("train.checkpoint_every", self.checkpoint_every)
        positive("train.log_every", self.log_every)
        choice("train.dtype", self.dtype, precision.SETTINGS)
        choice("train.step", self.step, STEPS)
        try:
            sparse_probe.check("train.sparse_below", self.sparse_below)
        except sparse_probe.SparseBelowError as exc:
            raise ParamsError(str(exc)) from None
        if self.target_l0 is not None:
            positive("train.target_l0", self.target_l0)
        in_range("train.l1_rate", self.l1_rate, 0.0, 1.0)
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ParamsError(f"train.eval_every: {self.eval_every!r} must be a non-negative integer")
        positive("train.eval_tokens", self.eval_tokens)
        in_range("train.converge_gain", self.converge_gain, 0.0, 1.0)
        in_range("train.converge_window", self.converge_window, 0.0, 1.0, low_open=True)
        in_range("train.min_frac", self.min_frac, 0.0, 1.0)
        in_range("train.resample_max", self.resample_max, 0.0, 1.0, low_open=True)
        for name in ("resample", "centre_init"):
            if not isinstance(getattr(self, name), bool):
                raise ParamsError(f"train.{name}: {getattr(self, name)!r} must be true or false")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ParamsError(f"train.seed: {self.seed!r} must be a non-negative integer")
