"""The dedicated-feature crosscoder (DFC), a variant beyond the paper's ReLU + L1, and how its exclusive
latents compare with a plain crosscoder's.

Jiralerspong & Bricken 2026 fix the exclusive latents in advance: some slots may only read
from and write to one model. `exclusive_agreement` compares the exclusive sets of a DFC with
those a plain crosscoder finds through relative norms. The class keeps the base interface and
registers itself in crosscoder.ARCHITECTURES on import (the crosscoders package imports it).
Shapes ride on names: N tokens, H latents, A/B widths.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .crosscoder import Crosscoder, CrosscoderConfig, register

DFC_PARTS = ("a_only", "b_only")
PLAIN_CLASSES = ("a_excl", "b_excl", "shared")
SAME_CLASS = {"a_only": "a_excl", "b_only": "b_excl", "shared": "shared"}


@register
class DedicatedFeatureCrosscoder(Crosscoder):
    """Crosscoder whose first n latents are A-only, next m B-only, the rest shared (DFC).

    An A-only latent reads only x_A (its W_enc_B column is 0) and writes only x̂_A (its
    W_dec_B row is 0); B-only mirrors it. The masks multiply the weights in every forward
    pass, so masked entries get zero gradient and stay exactly 0 (they are zeroed at init).
    Loss: the base ReLU + decoder-weighted L1.
    """

    architecture: ClassVar[str] = "dfc"

    def __init__(self, cfg: CrosscoderConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)
        n_a, n_b = dfc_slot_counts(cfg)
        H = cfg.dict_size
        uses_a_H = torch.ones(H)
        uses_b_H = torch.ones(H)
        uses_b_H[:n_a] = 0.0
        uses_a_H[n_a:n_a + n_b] = 0.0
        self.register_buffer("uses_A", uses_a_H)  # 1 where a latent reads/writes model A
        self.register_buffer("uses_B", uses_b_H)
        self.post_step()

    def pre_acts(self, x_NA: torch.Tensor, x_NB: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations through the masked encoders."""
        return x_NA @ (self.W_enc_A * self.uses_A) + x_NB @ (self.W_enc_B * self.uses_B) + self.b_enc

    def decode(self, f_NH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions through the masked decoders."""
        W_dec_HA = self.W_dec_A * self.uses_A[:, None]
        W_dec_HB = self.W_dec_B * self.uses_B[:, None]
        return f_NH @ W_dec_HA + self.b_dec_A, f_NH @ W_dec_HB + self.b_dec_B

    def decoder_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-latent norms of the masked decoders, [H] each."""
        return ((self.W_dec_A * self.uses_A[:, None]).norm(dim=1),
                (self.W_dec_B * self.uses_B[:, None]).norm(dim=1))

    @torch.no_grad()
    def post_step(self) -> None:
        """Re-zero masked weights (they already get no gradient; guards weight decay or edits)."""
        self.W_enc_A.mul_(self.uses_A)
        self.W_enc_B.mul_(self.uses_B)
        self.W_dec_A.mul_(self.uses_A[:, None])
        self.W_dec_B.mul_(self.uses_B[:, None])

    def partition(self) -> dict[str, torch.Tensor]:
        """Latent indices of each slot kind: {a_only, b_only, shared} -> LongTensor."""
        n_a, n_b = dfc_slot_counts(self.cfg)
        return {"a_only": torch.arange(0, n_a),
                "b_only": torch.arange(n_a, n_a + n_b),
                "shared": torch.arange(n_a + n_b, self.cfg.dict_size)}


def dfc_slot_counts(cfg: CrosscoderConfig) -> tuple[int, int]:
    """(A-only, B-only) slot counts from cfg.dfc_sizes, validated against dict_size."""
    unknown = sorted(set(cfg.dfc_sizes) - set(DFC_PARTS))
    if unknown:
        raise ValueError(f"crosscoder.dfc_sizes: unknown keys {unknown}; accepted: {', '.join(DFC_PARTS)}")
    counts = [cfg.dfc_sizes.get(part, 0) for part in DFC_PARTS]
    for part, n in zip(DFC_PARTS, counts):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"crosscoder.dfc_sizes.{part}: {n!r} is not a non-negative integer")
    if sum(counts) > cfg.dict_size:
        raise ValueError(f"crosscoder.dfc_sizes: a_only + b_only = {sum(counts)} exceeds "
                         f"dict_size {cfg.dict_size}")
    return counts[0], counts[1]


# -- agreement between a DFC's fixed partition and a plain crosscoder's relative norms ------
def plain_classes(n_rel_H: torch.Tensor, a_thr: float = 0.9, b_thr: float = 0.1) -> dict[str, torch.Tensor]:
    """Split a plain crosscoder's latents by relative norm: a_excl > a_thr, b_excl < b_thr, else shared."""
    if not 0.0 <= b_thr < a_thr <= 1.0:
        raise ValueError(f"thresholds b_thr={b_thr!r}, a_thr={a_thr!r}: need 0 <= b_thr < a_thr <= 1")
    a_H, b_H = n_rel_H > a_thr, n_rel_H < b_thr
    return {"a_excl": a_H.nonzero().flatten(), "b_excl": b_H.nonzero().flatten(),
            "shared": (~(a_H | b_H)).nonzero().flatten()}


def _unit_rows(W_dec_HA: torch.Tensor, W_dec_HB: torch.Tensor) -> torch.Tensor:
    W_HD = torch.cat([W_dec_HA, W_dec_HB], dim=1).double()
    return W_HD / W_HD.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _best_cos(U_dfc_MD: torch.Tensor, U_plain_HD: torch.Tensor,
              classes: dict[str, torch.Tensor], chunk: int = 1024) -> torch.Tensor:
    """[M, 3]: each DFC row's max cosine to the plain latents of each class (nan if empty)."""
    out_M3 = torch.full((U_dfc_MD.shape[0], len(PLAIN_CLASSES)), float("nan"), dtype=torch.float64)
    for c, name in enumerate(PLAIN_CLASSES):
        U_cD = U_plain_HD[classes[name]]
        if U_cD.shape[0] == 0:
            continue
        for start in range(0, U_dfc_MD.shape[0], chunk):
            block = U_dfc_MD[start:start + chunk] @ U_cD.T
            out_M3[start:start + chunk, c] = block.max(dim=1).values
    return out_M3


def exclusive_agreement(
    dfc_partition: dict[str, torch.Tensor],
    dfc_W_dec_A: torch.Tensor, dfc_W_dec_B: torch.Tensor,
    plain_W_dec_A: torch.Tensor, plain_W_dec_B: torch.Tensor,
    n_rel_H_of_plain: torch.Tensor | None = None,
    a_thr: float = 0.9, b_thr: float = 0.1, cos_thr: float = 0.7,
    dfc_live_H: torch.Tensor | None = None, plain_live_H: torch.Tensor | None = None,
) -> dict:
    """How well a DFC's fixed slot kinds match the classes a plain crosscoder's n_rel finds.

    Latents are not indexed alike across the two crosscoders, so they are matched by
    decoder direction: each latent's direction is its concatenated decoder row
    [W_dec_A[i] | W_dec_B[i]] (length dA + dB), unit-normed. Concatenating keeps the A/B
    split: an A-only DFC latent [d, 0] matches a plain A-exclusive latent [d, ~0] with
    cos ~ 1 but a plain shared latent [d, d'] of equal halves with at most cos ~ 0.71.
    Plain classes (`plain_classes`): a_excl (n_rel > a_thr), b_excl (n_rel < b_thr),
    shared (the rest); n_rel is computed from the plain decoders when not given.
    For every DFC latent of each slot kind in `dfc_partition` (a_only, b_only, and shared
    if present) we take the max cosine to the plain latents of each class. Reported:
      matched_fraction[kind]   fraction whose max cosine to the *same* class
                               (a_only~a_excl, b_only~b_excl, shared~shared) exceeds cos_thr;
      confusion[kind][class]   counts by the class of the overall best match, or
                               "unmatched" when that best cosine is <= cos_thr;
      mean_best_cos_same[kind] mean of the same-class max cosine;
      n_plain[class], n_dfc[kind]; best_cos[kind] the [n, 3] tensor of max cosines
                               (columns in PLAIN_CLASSES order), the one non-JSON entry.
    Optional bool masks dfc_live_H / plain_live_H drop dead latents (random decoders) first.
    Empty plain classes give nan cosines, which never match.
    """
    if n_rel_H_of_plain is None:
        norm_a, norm_b = plain_W_dec_A.norm(dim=1), plain_W_dec_B.norm(dim=1)
        n_rel_H_of_plain = norm_a / (norm_a + norm_b).clamp_min(1e-12)
    classes = plain_classes(n_rel_H_of_plain, a_thr, b_thr)
    if plain_live_H is not None:
        classes = {k: v[plain_live_H[v]] for k, v in classes.items()}
    U_plain_HD = _unit_rows(plain_W_dec_A, plain_W_dec_B)
    U_dfc_HD = _unit_rows(dfc_W_dec_A, dfc_W_dec_B)
    result: dict = {"cos_thr": cos_thr, "a_thr": a_thr, "b_thr": b_thr,
                    "n_plain": {k: int(v.numel()) for k, v in classes.items()},
                    "n_dfc": {}, "matched_fraction": {}, "mean_best_cos_same": {},
                    "confusion": {}, "best_cos": {}}
    for kind, idx in dfc_partition.items():
        if kind not in SAME_CLASS:
            raise ValueError(f"dfc_partition key {kind!r} is unknown; accepted: {', '.join(SAME_CLASS)}")
        if dfc_live_H is not None:
            idx = idx[dfc_live_H[idx]]
        best_M3 = _best_cos(U_dfc_HD[idx], U_plain_HD, classes)
        same_M = best_M3[:, PLAIN_CLASSES.index(SAME_CLASS[kind])]
        result["n_dfc"][kind] = int(idx.numel())
        result["matched_fraction"][kind] = _mean((same_M > cos_thr).double())
        result["mean_best_cos_same"][kind] = _mean(same_M[~same_M.isnan()])
        result["confusion"][kind] = _confusion_row(best_M3, cos_thr)
        result["best_cos"][kind] = best_M3
    return result


def _confusion_row(best_M3: torch.Tensor, cos_thr: float) -> dict[str, int]:
    """Counts of DFC latents by the class of their overall best match (or unmatched)."""
    filled_M3 = best_M3.nan_to_num(-2.0)
    top_M, which_M = filled_M3.max(dim=1)
    row = {name: int(((which_M == c) & (top_M > cos_thr)).sum()) for c, name in enumerate(PLAIN_CLASSES)}
    row["unmatched"] = int((top_M <= cos_thr).sum())
    return row


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")
