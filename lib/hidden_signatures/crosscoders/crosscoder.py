"""Crosscoders with per-model widths (PAPER.md): one dictionary read from and written to two models.

Shapes ride on names: H latents, A/B the two models' widths, N tokens.
Variants share one interface (encode / decode / forward / loss) and are looked up by the
params' `architecture` in ARCHITECTURES.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .. import io

WEIGHTS_FILE = "crosscoder.safetensors"
CONFIG_FILE = "crosscoder_config.json"
PARAM_NAMES = ("W_enc_A", "W_enc_B", "b_enc", "W_dec_A", "W_dec_B", "b_dec_A", "b_dec_B")
"""The tensors of a crosscoder under their public names and shapes (the saved file's)."""
ENCODER_STORAGE = {"W_enc_A": "W_enc_HA", "W_enc_B": "W_enc_HB"}
"""Public encoder name -> the parameter that stores it transposed, latent by latent."""


@dataclass
class CrosscoderConfig:
    """What builds a crosscoder; saved beside its weights so loading never guesses."""

    d_a: int
    """Width of model A's residual stream."""
    d_b: int
    """Width of model B's residual stream."""
    dict_size: int = 4096
    """Number of latents H (the paper uses 2**14)."""
    architecture: str = "relu_l1"
    """Registered variant name (see ARCHITECTURES)."""
    dec_init_norm: float | None = None
    """Norm of each decoder row at initialisation; None: the architecture's own
    (`default_dec_init_norm`: 0.08 for the paper's ReLU + L1, 0.5 for BatchTopK)."""
    k: int = 32
    """Mean active latents per token (BatchTopK only)."""
    aux_k: int = 512
    """Dead latents used in the auxiliary loss (BatchTopK only)."""
    aux_coeff: float = 1.0 / 32
    """Weight of the auxiliary dead-latent loss (BatchTopK only)."""
    dfc_sizes: dict[str, int] = field(default_factory=dict)
    """Slots per partition for the dedicated-feature variant: {a_only, b_only} (rest shared)."""
    threshold_beta: float = 0.99
    """EMA factor of the BatchTopK inference threshold."""
    dead_after_tokens: int = 1_000_000
    """A latent silent for this many tokens counts as dead (BatchTopK auxiliary loss)."""

    def __post_init__(self) -> None:
        for name in ("d_a", "d_b", "dict_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"crosscoder.{name}: {value!r} is not a positive integer")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"crosscoder.architecture: {self.architecture!r} is unknown; "
                f"accepted: {', '.join(sorted(ARCHITECTURES))}")
        if self.dec_init_norm is None:
            self.dec_init_norm = ARCHITECTURES[self.architecture].default_dec_init_norm

    @classmethod
    def from_dict(cls, data: dict) -> "CrosscoderConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LossParts:
    """One batch's loss and its parts (all scalars)."""

    total: torch.Tensor
    mse_a: torch.Tensor
    mse_b: torch.Tensor
    sparsity: torch.Tensor
    l0: torch.Tensor
    aux: torch.Tensor | None = None
    fired: torch.Tensor | None = None
    """Bool [H]: latents active on at least one token of the batch (for dead-latent logging)."""


class Crosscoder(nn.Module):
    """ReLU crosscoder with an L1 penalty weighted by the summed decoder norms (the paper's)."""

    architecture: ClassVar[str] = "relu_l1"
    steered_by_l1: ClassVar[bool] = True
    """Whether the L1 weight sets the sparsity (so the trainer steers it toward train.target_l0)."""
    default_dec_init_norm: ClassVar[float] = 0.08
    """Decoder row norm at initialisation unless the config names one (the paper's 0.08)."""
    resample_dec_scale: ClassVar[float] = 0.2
    """A resampled latent's decoder rows start at this share of the mean live decoder norm (small
    under L1, whose penalty grows with the norm)."""

    def __init__(self, cfg: CrosscoderConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        H, A, B = cfg.dict_size, cfg.d_a, cfg.d_b
        W_dec_A = _rows_with_norm(torch.randn(H, A, generator=generator), cfg.dec_init_norm)
        W_dec_B = _rows_with_norm(torch.randn(H, B, generator=generator), cfg.dec_init_norm)
        self.W_dec_A = nn.Parameter(W_dec_A)
        self.W_dec_B = nn.Parameter(W_dec_B)
        # The encoders start as the decoders' transposes and are stored latent by latent, [H, A] like
        # the decoders (read as W_enc_A [A, H]): the training step builds their gradients latent by
        # latent (fused_loss.py), so no weight-sized transpose is paid per step. Contiguous, as a
        # fused optimizer walks a parameter and its state as flat memory.
        self.W_enc_HA = nn.Parameter(W_dec_A.clone())
        self.W_enc_HB = nn.Parameter(W_dec_B.clone())
        self.b_enc = nn.Parameter(torch.zeros(H))
        self.b_dec_A = nn.Parameter(torch.zeros(A))
        self.b_dec_B = nn.Parameter(torch.zeros(B))

    @property
    def W_enc_A(self) -> torch.Tensor:
        """Model A's encoder [A, H]: a view of the stored W_enc_HA (products give the same bits as
        with a row-major copy, except fp32 ones of fewer than 8 rows: `centre` takes a copy)."""
        return self.W_enc_HA.T

    @property
    def W_enc_B(self) -> torch.Tensor:
        """Model B's encoder [B, H]: a view of the stored W_enc_HB."""
        return self.W_enc_HB.T

    def stored(self, name: str) -> nn.Parameter:
        """The parameter that holds the tensor named `name` (PARAM_NAMES): what its gradient and an
        optimizer's state belong to and are laid out like."""
        return getattr(self, ENCODER_STORAGE.get(name, name))

    @staticmethod
    def as_named(name: str, t: torch.Tensor) -> torch.Tensor:
        """`t`, laid out like the parameter `stored(name)` (its gradient, its optimizer state), seen
        in the layout of the public tensor `name`: a transposed view for the encoders."""
        return t.T if name in ENCODER_STORAGE else t

    # -- the three steps -------------------------------------------------------------
    def pre_acts(self, x_NA: torch.Tensor, x_NB: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations from both models' activations (two fused multiply-adds)."""
        return torch.addmm(torch.addmm(self.b_enc, x_NA, self.W_enc_A), x_NB, self.W_enc_B)

    def encode(self, x_NA: torch.Tensor, x_NB: torch.Tensor) -> torch.Tensor:
        """Latent activations f [N, H]."""
        return torch.relu(self.pre_acts(x_NA, x_NB))

    def decode(self, f_NH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions of both models' activations from latents."""
        return torch.addmm(self.b_dec_A, f_NH, self.W_dec_A), torch.addmm(self.b_dec_B, f_NH, self.W_dec_B)

    def forward(self, x_NA: torch.Tensor, x_NB: torch.Tensor):
        f_NH = self.encode(x_NA, x_NB)
        return (f_NH, *self.decode(f_NH))

    # -- loss ---------------------------------------------------------------------------
    def decoder_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-latent decoder norms for A and B, [H] each."""
        return self.W_dec_A.norm(dim=1), self.W_dec_B.norm(dim=1)

    def loss(self, x_NA: torch.Tensor, x_NB: torch.Tensor, l1_coeff: float) -> LossParts:
        """Summed squared error per model (mean over tokens) + l1_coeff * decoder-weighted L1."""
        f_NH, xhat_NA, xhat_NB = self(x_NA, x_NB)
        mse_a = (xhat_NA.float() - x_NA.float()).pow(2).sum(-1).mean()
        mse_b = (xhat_NB.float() - x_NB.float()).pow(2).sum(-1).mean()
        norm_a, norm_b = self.decoder_norms()
        # sum_n sum_i f_ni (|d_Ai| + |d_Bi|) / N, without an [N, H] fp32 copy of f
        sparsity = torch.sum(f_NH, 0, dtype=torch.float32) @ (norm_a + norm_b).float() / f_NH.shape[0]
        with torch.no_grad():
            active_NH = f_NH > 0
            l0 = active_NH.sum(dtype=torch.float32) / f_NH.shape[0]
            fired = active_NH.any(0)
        total = mse_a + mse_b + l1_coeff * sparsity
        return LossParts(total=total, mse_a=mse_a, mse_b=mse_b, sparsity=sparsity, l0=l0, fired=fired)

    @torch.no_grad()
    def centre(self, mean_A: torch.Tensor, mean_B: torch.Tensor) -> None:
        """Start at the data's mean: decoder biases at it, the encoder bias so that every latent's
        pre-activation is zero there (each then fires on about half the tokens, none on none)."""
        self.b_dec_A.copy_(mean_A)
        self.b_dec_B.copy_(mean_B)
        W_A, W_B = self.W_enc_A.contiguous(), self.W_enc_B.contiguous()  # a row-major vector product's bits
        self.b_enc.copy_(-(mean_A.to(W_A) @ W_A + mean_B.to(W_B) @ W_B))
        self.post_step()

    def post_step(self) -> None:
        """Called by the trainer after each optimizer step; variants re-impose constraints here."""

    def resampled(self, dead: torch.Tensor) -> None:
        """Called after latents `dead` (indices) were resampled; variants reset per-latent state."""

    # -- persistence ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters (and any buffers) under their public names, fp32 on CPU."""
        out = {name: getattr(self, name).detach().float().cpu() for name in PARAM_NAMES}
        out.update({n: b.detach().float().cpu() for n, b in self.named_buffers()})
        return out

    def save(self, directory: str | Path) -> None:
        """Write crosscoder.safetensors + crosscoder_config.json (both atomically)."""
        directory = Path(directory)
        io.save_tensors(directory / WEIGHTS_FILE, self.state_tensors())
        io.write_json(directory / CONFIG_FILE, asdict(self.cfg))


def _rows_with_norm(W: torch.Tensor, norm: float) -> torch.Tensor:
    return W * (norm / W.norm(dim=1, keepdim=True).clamp_min(1e-12))


ARCHITECTURES: dict[str, type[Crosscoder]] = {"relu_l1": Crosscoder}


def register(cls: type[Crosscoder]) -> type[Crosscoder]:
    """Class decorator adding a variant to ARCHITECTURES under cls.architecture."""
    ARCHITECTURES[cls.architecture] = cls
    return cls


def build(cfg: CrosscoderConfig, seed: int = 0) -> Crosscoder:
    """A freshly initialised crosscoder of the configured architecture, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return ARCHITECTURES[cfg.architecture](cfg, generator=gen)


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> Crosscoder:
    """Load a saved crosscoder; refuses anything but the expected safetensors names and shapes."""
    directory = Path(directory)
    cfg = CrosscoderConfig.from_dict(io.read_json(directory / CONFIG_FILE))
    tensors = io.load_tensors(directory / WEIGHTS_FILE)
    model = ARCHITECTURES[cfg.architecture](cfg)
    load_state(model, tensors, directory / WEIGHTS_FILE)
    return model.to(map_location)


def load_state(model: Crosscoder, tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy named tensors into `model`, naming the file and tensor on any mismatch."""
    expected = model.state_tensors()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise io.ArtifactError(f"{source}: missing tensors {missing}")
    with torch.no_grad():
        for name, ref in expected.items():
            if tensors[name].shape != ref.shape:
                raise io.ArtifactError(
                    f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                    f"expected {tuple(ref.shape)}")
            getattr(model, name).copy_(tensors[name])

