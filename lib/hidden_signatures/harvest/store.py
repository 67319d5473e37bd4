"""The activation store on disk (one memory-mapped bf16 file per layer, a manifest written last) and
PairedActivations, the row-paired, scaled view of two stores that the crosscoders train on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import io

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
INDEX = "index.safetensors"
STORE_VERSION = 1


def layer_file(directory: Path, layer: int) -> Path:
    return directory / f"layer_{layer}.bin"


@dataclass
class ActivationStore:
    """A finished store of one model's activations at several layers, opened read-only."""

    directory: Path
    manifest: dict

    @classmethod
    def open(cls, directory: str | Path) -> "ActivationStore":
        directory = Path(directory)
        manifest = verify_store(directory)
        if manifest is None:
            raise io.ArtifactError(f"{directory}: activation store missing or incomplete")
        return cls(directory, manifest)

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.manifest["layers"]]

    def seq_ptr(self) -> torch.Tensor:
        """Row offsets per sequence, [S + 1]."""
        return io.load_tensors(self.directory / INDEX)["seq_ptr"]

    def positions(self) -> torch.Tensor:
        """Token position of every row within its sequence, [N]."""
        return io.load_tensors(self.directory / INDEX)["pos"]

    def rows(self, layer: int) -> np.memmap:
        """The [N, d] bf16 bits of one layer as a read-only memmap of uint16."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} not in store {self.directory} (has {self.layers})")
        return np.memmap(layer_file(self.directory, layer), dtype=np.uint16, mode="r",
                         shape=(self.n_tokens, self.d_model))

    def norm_factor(self, layer: int) -> float:
        return float(self.manifest["norm_factors"][str(layer)])


def to_float(rows_u16: np.ndarray) -> torch.Tensor:
    """bf16 bits (uint16) -> float32 tensor."""
    return torch.from_numpy(np.array(rows_u16, copy=True).view(np.int16)).view(torch.bfloat16).float()


def verify_store(directory: Path) -> dict | None:
    """The manifest of a complete, size-consistent store, or None (missing, partial or corrupt)."""
    try:
        manifest = io.read_json(directory / MANIFEST)
    except io.ArtifactError:
        return None
    if manifest.get("version") != STORE_VERSION or not manifest.get("complete"):
        return None
    expected = int(manifest["n_tokens"]) * int(manifest["d_model"]) * 2
    for layer in manifest["layers"]:
        path = layer_file(directory, int(layer))
        if not path.exists() or path.stat().st_size != expected:
            return None
    if not (directory / INDEX).exists():
        return None
    return manifest


def store_key(model_id: str, ids_SL: torch.Tensor, positions: list[torch.Tensor],
              layers: list[int], dtype: str) -> str:
    """Cache key: everything that determines the store's bytes."""
    import hashlib
    digest = hashlib.sha256(ids_SL.numpy().tobytes())
    for pos in positions:
        digest.update(pos.numpy().astype(np.int64).tobytes())
    return io.config_hash({"model": model_id, "data": digest.hexdigest(), "layers": sorted(layers),
                           "dtype": dtype, "version": STORE_VERSION})


EVAL_SPLIT = "spread"
"""Which sequences are held out (part of every training key, so a change retrains)."""


def eval_sequences(n_seqs: int, fraction: float) -> np.ndarray:
    """Bool [n_seqs]: the held-out sequences, evenly spread over the corpus (at least one).

    Spread rather than a tail: the corpus runs module by module, so a tail would hold out a few
    modules' topics and read as a distribution shift instead of unseen text of the same kind.
    """
    n_eval = min(n_seqs, max(1, int(round(n_seqs * fraction))))
    held_out = np.zeros(n_seqs, dtype=bool)
    held_out[np.floor((np.arange(n_eval) + 0.5) * n_seqs / n_eval).astype(np.int64)] = True
    return held_out


@dataclass
class PairedActivations:
    """Row-aligned activations of models A and B at one layer each, scaled to mean norm sqrt(d).

    An `eval_fraction` of the sequences, spread evenly over the corpus, is held out for
    evaluation. Rows whose norm exceeds `max_norm_ratio` times the median in either model
    (massive activations of attention-sink tokens, about 0.01% of rows in SmolLM2's middle layers,
    with 100x the typical norm) are left out of both: one such row would outweigh ten thousand
    ordinary ones in the squared error.
    """

    store_a: ActivationStore
    store_b: ActivationStore
    layer_a: int
    layer_b: int
    eval_fraction: float = 0.1
    max_norm_ratio: float | None = 10.0

    def __post_init__(self) -> None:
        if self.store_a.n_tokens != self.store_b.n_tokens:
            raise io.ArtifactError(f"stores {self.store_a.directory} and {self.store_b.directory} "
                                   "hold different numbers of rows; they are not a pair")
        self.x_a = self.store_a.rows(self.layer_a)
        self.x_b = self.store_b.rows(self.layer_b)
        self.scale_a = self.store_a.norm_factor(self.layer_a)
        self.scale_b = self.store_b.norm_factor(self.layer_b)
        seq_ptr = self.store_a.seq_ptr().numpy()
        held_out = eval_sequences(len(seq_ptr) - 1, self.eval_fraction)
        eval_mask = np.repeat(held_out, np.diff(seq_ptr))
        keep = self._ordinary_rows()
        rows = np.arange(self.n_tokens)
        self.train_rows = rows[~eval_mask & keep]
        self.eval_rows = rows[eval_mask & keep]
        self.n_outliers = int((~keep).sum())
        self._eval_variance: dict[tuple[int | None, int], tuple[float, float]] = {}

    def _ordinary_rows(self, chunk: int = 65_536) -> np.ndarray:
        """Bool [N]: rows whose norm is within max_norm_ratio x the median in both models."""
        keep = np.ones(self.n_tokens, dtype=bool)
        if self.max_norm_ratio is None:
            return keep
        for rows in (self.x_a, self.x_b):
            norms = np.concatenate([to_float(rows[i: i + chunk]).norm(dim=1).numpy()
                                    for i in range(0, self.n_tokens, chunk)])
            keep &= norms <= self.max_norm_ratio * np.median(norms)
        return keep

    @property
    def n_train(self) -> int:
        """Training rows (indices into train_rows)."""
        return len(self.train_rows)

    @property
    def n_tokens(self) -> int:
        return self.store_a.n_tokens

    @property
    def d_a(self) -> int:
        return self.store_a.d_model

    @property
    def d_b(self) -> int:
        return self.store_b.d_model

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled float32 rows at these store indices (sorted reads are fastest from disk)."""
        return to_float(self.x_a[idx]) * self.scale_a, to_float(self.x_b[idx]) * self.scale_b

    def train_batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled rows at these positions of the training set."""
        return self.get(np.sort(self.train_rows[positions]))

    def eval_total_variance(self, max_tokens: int | None, batch_size: int) -> tuple[float, float]:
        """Summed per-dimension variance of the scaled eval rows of both models (two-pass, fp64),
        the denominators of held-out explained variance; computed once per size (every held-out
        evaluation of a training run reads the same rows)."""
        key = (max_tokens, batch_size)
        if key not in self._eval_variance:
            idx = self.eval_indices(max_tokens)
            chunks = [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
            means = [sum(self.get(c)[side].double().sum(0) for c in chunks) / len(idx) for side in (0, 1)]
            self._eval_variance[key] = tuple(sum((self.get(c)[side].double() - means[side]).pow(2).sum().item()
                                                 for c in chunks) for side in (0, 1))
        return self._eval_variance[key]

    def eval_indices(self, max_tokens: int | None = None) -> np.ndarray:
        """Store indices of the held-out evaluation rows, evenly thinned to max_tokens."""
        idx = self.eval_rows
        if max_tokens is not None and len(idx) > max_tokens:
            idx = idx[np.linspace(0, len(idx) - 1, num=max_tokens).astype(np.int64)]
        return idx
