"""A small latent browser: the contexts where a latent fires hardest, token highlighted, as HTML."""

from __future__ import annotations

import html

import numpy as np
import torch

from ..crosscoders import crosscoder as cc_mod
from ..harvest.store import PairedActivations


@torch.no_grad()
def top_activations(model: cc_mod.Crosscoder, data: PairedActivations, latents: list[int],
                    max_tokens: int = 20_000, k: int = 5, batch_size: int = 4096) -> dict[int, list[tuple[int, float]]]:
    """For each latent, its k highest activations on the eval rows as (row index, value)."""
    model.eval()
    idx = data.eval_indices(max_tokens)
    device = next(model.parameters()).device
    best = {i: [] for i in latents}
    cols = torch.tensor(latents, dtype=torch.long)
    for start in range(0, len(idx), batch_size):
        chunk = idx[start: start + batch_size]
        x_a, x_b = (t.to(device) for t in data.get(chunk))
        f = model.encode(x_a, x_b)[:, cols.to(device)].float().cpu()
        for j, latent in enumerate(latents):
            values, rows = f[:, j].topk(min(k, len(chunk)))
            best[latent] += [(int(chunk[r]), float(v)) for v, r in zip(values, rows) if v > 0]
    return {i: sorted(v, key=lambda t: -t[1])[:k] for i, v in best.items()}


def row_location(seq_ptr: torch.Tensor, positions: torch.Tensor, row: int) -> tuple[int, int]:
    """(sequence, position) of a store row."""
    seq = int(np.searchsorted(seq_ptr.numpy(), row, side="right") - 1)
    return seq, int(positions[row])


def context_html(tokenizer, ids_SL: torch.Tensor, seq: int, pos: int, value: float, window: int = 12) -> str:
    """One line of text around a token, the token itself highlighted."""
    lo = max(1, pos - window)
    before = tokenizer.decode(ids_SL[seq, lo:pos])
    token = tokenizer.decode(ids_SL[seq, pos: pos + 1])
    after = tokenizer.decode(ids_SL[seq, pos + 1: pos + 4])
    return (f"<div style='font-family:monospace;white-space:pre-wrap'>{value:7.2f} │ "
            f"{html.escape(before)}<b style='background:#ffd54f'>{html.escape(token)}</b>"
            f"{html.escape(after)}</div>")


def latent_cards(model: cc_mod.Crosscoder, data: PairedActivations, tokenizer, ids_SL: torch.Tensor,
                 groups: dict[str, list[int]], k: int = 5, max_tokens: int = 20_000) -> str:
    """HTML cards: for each group (e.g. A-only / B-only / shared) and latent, its top contexts in model A's text."""
    latents = sorted({i for ids in groups.values() for i in ids})
    tops = top_activations(model, data, latents, max_tokens=max_tokens, k=k)
    seq_ptr, positions = data.store_a.seq_ptr(), data.store_a.positions()
    parts = []
    for group, ids in groups.items():
        parts.append(f"<h4>{html.escape(group)}</h4>")
        for latent in ids:
            parts.append(f"<div><b>latent {latent}</b></div>")
            for row, value in tops[latent]:
                seq, pos = row_location(seq_ptr, positions, row)
                parts.append(context_html(tokenizer, ids_SL, seq, pos, value))
    return "\n".join(parts)


def pick_latents(n_rel_H: torch.Tensor, mean_act_H: torch.Tensor, a_only: float, b_only: float,
                 shared: tuple[float, float], per_group: int = 3) -> dict[str, list[int]]:
    """The most active latents of each class (A-only, B-only, shared)."""
    masks = {"A-only": n_rel_H > a_only, "B-only": n_rel_H < b_only,
             "shared": (n_rel_H > shared[0]) & (n_rel_H < shared[1])}
    out = {}
    for name, mask in masks.items():
        scores = torch.where(mask & (mean_act_H > 0), mean_act_H, torch.full_like(mean_act_H, -1.0))
        top = scores.argsort(descending=True)[:per_group]
        out[name] = [int(i) for i in top if scores[i] > 0]
    return out
