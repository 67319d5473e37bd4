"""Splice-in fidelity: run each model with its layer input replaced by the crosscoder's reconstruction.

Reconstruction error in activation space says little about what the model loses; the change in
next-token cross-entropy does. For held-out sequences, each model runs three times: clean, with
the residual stream entering the compared block replaced by the crosscoder's reconstruction at
the harvested positions, and with it zeroed there (the scale of total loss). Reported: the CE of
each, the CE increase and the KL from the clean next-token distribution.

For speed, consecutive sequences of equal length run as one batch (never padded): one clean pass
saves the block's input and the logits, then one pass of twice the batch runs spliced and zeroed
together, skipping the blocks before the replaced input (their output is overwritten anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..crosscoders import crosscoder as cc_mod
from ..models import loading as models

LOGITS_BUDGET = 2 ** 27  # logit elements in one spliced + zeroed batch (256 MB in bf16): caps the sequences batched
LOSSES = ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero")
ROWS_BUDGET = 2 ** 18  # logit elements per step of the loss computation: small enough to stay in cache


class SplicedModel:
    """A model wrapped by nnsight, with helpers to read or replace one block's input."""

    def __init__(self, model, tokenizer, layer: int):
        from nnsight.modeling.transformers import TransformersModel

        self.nn = TransformersModel(model, tokenizer=tokenizer)
        envoy = self.nn
        for part in models.block_path(model).split("."):
            envoy = getattr(envoy, part)
        self.blocks, self.layer = envoy, layer
        self.vocab = _vocab_size(model)

    @torch.no_grad()
    def layer_input(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the block, [B, T, d] (the forward pass stops there)."""
        with self.nn.trace(ids_BT) as tracer:
            saved = self.blocks[self.layer].input.save()
            tracer.stop()
        return saved

    @torch.no_grad()
    def logits(self, ids_BT: torch.Tensor, new_input_BTD: torch.Tensor | None = None) -> torch.Tensor:
        """Output logits, with the block's input replaced by `new_input_BTD` when given."""
        with self.nn.trace(ids_BT):
            if new_input_BTD is not None:
                self.blocks[self.layer].input = new_input_BTD
            out = self.nn.output.save()
        return _logits(out)

    @torch.no_grad()
    def clean(self, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's input [B, T, d] and the clean logits [B, T, V], from one forward pass."""
        with self.nn.trace(ids_BT):
            saved = self.blocks[self.layer].input.save()
            out = self.nn.output.save()
        return saved, _logits(out)

    @torch.no_grad()
    def spliced_logits(self, ids_BT: torch.Tensor, new_input_BTD: torch.Tensor) -> torch.Tensor:
        """Same as `logits(ids, new_input)`, but the blocks before the replaced input are skipped, not run."""
        with self.nn.trace(ids_BT):
            for i in range(self.layer):  # a skipped block returns new_input: the right shape, then overwritten
                self.blocks[i].skip(new_input_BTD)
            self.blocks[self.layer].input = new_input_BTD
            out = self.nn.output.save()
        return _logits(out)


def _logits(out) -> torch.Tensor:
    """The logits of a model output (a ModelOutput or a tuple)."""
    return out.logits if hasattr(out, "logits") else out[0]


def _vocab_size(model) -> int:
    """Rows of the unembedding: the logits' last dimension."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size


def next_token_ce(logits_TV: torch.Tensor, ids_T: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting token p+1 from position p, for the given positions (p < T-1)."""
    pos = pos[pos < ids_T.shape[0] - 1]
    return F.cross_entropy(logits_TV[pos].float(), ids_T[pos + 1], reduction="none")


def kl_from_clean(clean_TV: torch.Tensor, other_TV: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) of the next-token distributions at the given positions."""
    pos = pos[pos < clean_TV.shape[0] - 1]
    p = F.log_softmax(clean_TV[pos].float(), -1)
    q = F.log_softmax(other_TV[pos].float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def replaced(x_TD: torch.Tensor, pos: torch.Tensor, rows_PD: torch.Tensor) -> torch.Tensor:
    """A copy of x with rows at `pos` replaced."""
    out = x_TD.clone()
    out[pos] = rows_PD.to(out.device, out.dtype)
    return out


@torch.no_grad()
def fidelity(cc: cc_mod.Crosscoder, side_a: SplicedModel, side_b: SplicedModel,
             ids_a: list[torch.Tensor], ids_b: list[torch.Tensor], pos_a: list[torch.Tensor],
             pos_b: list[torch.Tensor], scale_a: float, scale_b: float,
             max_norm_ratio: float | None = 10.0) -> dict[str, dict[str, float]]:
    """Clean / spliced / zero-ablated CE and KL for both models, batching runs of equal-length sequences."""
    sums = {s: dict.fromkeys(LOSSES, 0.0) | {"n": 0} for s in ("A", "B")}
    device = next(cc.parameters()).device
    for chunk in _chunks(side_a, side_b, ids_a, ids_b):
        ia, ib = torch.stack([ids_a[i] for i in chunk]), torch.stack([ids_b[i] for i in chunk])
        xa, clean_a = side_a.clean(ia)
        xb, clean_b = side_b.clean(ib)
        rows_a, rows_b = [], []
        for j, i in enumerate(chunk):  # one sequence at a time: a BatchTopK encoding depends on its batch
            pa, pb = _ordinary(xa[j], xb[j], pos_a[i], pos_b[i], scale_a, scale_b, max_norm_ratio)
            f = cc.encode(xa[j, pa].float().to(device) * scale_a, xb[j, pb].float().to(device) * scale_b)
            xa_hat, xb_hat = cc.decode(f)
            rows_a.append((pa, xa_hat.cpu() / scale_a))
            rows_b.append((pb, xb_hat.cpu() / scale_b))
        _splice_side(sums["A"], side_a, ia, xa, clean_a, rows_a)
        _splice_side(sums["B"], side_b, ib, xb, clean_b, rows_b)
    return {side: {k: v / max(1, s["n"]) for k, v in s.items() if k != "n"} | _deltas(s) for side, s in sums.items()}


def _chunks(side_a: SplicedModel, side_b: SplicedModel, ids_a: list[torch.Tensor],
            ids_b: list[torch.Tensor]) -> list[list[int]]:
    """Runs of consecutive sequences with equal lengths on each side (never padded), within the logits budget."""
    chunks: list[list[int]] = []
    for i, (ia, ib) in enumerate(zip(ids_a, ids_b)):
        cap = max(1, LOGITS_BUDGET // (2 * max(len(ia) * side_a.vocab, len(ib) * side_b.vocab)))
        last = chunks[-1] if chunks else None
        if last and (len(ids_a[last[0]]), len(ids_b[last[0]])) == (len(ia), len(ib)) and len(last) < cap:
            last.append(i)
        else:
            chunks.append([i])
    return chunks


def _ordinary(xa: torch.Tensor, xb: torch.Tensor, pa: torch.Tensor, pb: torch.Tensor, scale_a: float,
              scale_b: float, ratio: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop positions the crosscoder never trained on: scaled norm above ratio x sqrt(d) in either model."""
    if ratio is None:
        return pa, pb
    keep = ((xa[pa].float().norm(dim=-1) * scale_a <= ratio * xa.shape[-1] ** 0.5)
            & (xb[pb].float().norm(dim=-1) * scale_b <= ratio * xb.shape[-1] ** 0.5))
    return pa[keep], pb[keep]


def _splice_side(acc: dict, side: SplicedModel, ids_BT: torch.Tensor, x_BTD: torch.Tensor,
                 clean_BTV: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run one side's chunk spliced and zeroed in one batch of 2B and add its losses to acc."""
    spliced = [replaced(x, pos, hat) for x, (pos, hat) in zip(x_BTD, rows)]
    zeroed = [replaced(x, pos, torch.zeros_like(hat)) for x, (pos, hat) in zip(x_BTD, rows)]
    logits = side.spliced_logits(ids_BT.repeat(2, 1), torch.stack(spliced + zeroed))
    for j, (pos, _) in enumerate(rows):
        _add_losses(acc, ids_BT[j], pos, clean_BTV[j], logits[j], logits[len(rows) + j])


def _add_losses(acc: dict, ids_T: torch.Tensor, pos: torch.Tensor, clean_TV: torch.Tensor,
                spliced_TV: torch.Tensor, zeroed_TV: torch.Tensor) -> None:
    """Add the summed CE of the three runs and KL from clean at `pos`, a few cache-sized rows at a time."""
    pos = pos[pos < ids_T.shape[0] - 1]
    for rows in pos.split(max(1, ROWS_BUDGET // clean_TV.shape[-1])):
        target = ids_T[rows + 1, None]
        lp, ls, lz = (F.log_softmax(t[rows].float(), -1) for t in (clean_TV, spliced_TV, zeroed_TV))
        p = lp.exp()
        ce = [-logp.gather(1, target).sum() for logp in (lp, ls, lz)]
        kl = [(p * (lp - logq)).sum() for logq in (ls, lz)]
        for key, value in zip(LOSSES, torch.stack(ce + kl).tolist()):
            acc[key] += value
    acc["n"] += len(pos)


def _deltas(s: dict) -> dict[str, float]:
    n = max(1, s["n"])
    ce_clean, ce_spliced, ce_zero = s["ce_clean"] / n, s["ce_spliced"] / n, s["ce_zero"] / n
    recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean) if ce_zero != ce_clean else None
    return {"ce_increase": ce_spliced - ce_clean, "ce_increase_zero": ce_zero - ce_clean,
            "loss_recovered": recovered, "tokens": s["n"]}
