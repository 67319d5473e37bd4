"""Token sequences for a pair whose tokenizers differ, paired on character offsets.

The crosscoder part of the corpus is walked in windows: each window is tokenised by both
models and cut to one sequence each (seq_len tokens with BOS); the positions where both
tokenizers end a token at the same character (token_alignment's rules, whitespace-only tokens
skipped) are the rows harvested from each model. The next window starts at the first
character both sequences have not fully read.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch

from .. import io
from ..data import corpus, token_alignment
from .params import RunConfig


@dataclass
class PairTokens:
    """Each model's token sequences and the positions harvested from each (row-paired)."""

    ids_a: torch.Tensor
    ids_b: torch.Tensor
    pos_a: list[torch.Tensor]
    pos_b: list[torch.Tensor]
    same_tokenizer: bool
    aligned_fraction: float

    @property
    def n_pairs(self) -> int:
        return sum(len(p) for p in self.pos_a)


def aligned_tokens(run: RunConfig, tok_a, tok_b):
    """PairTokens for two different tokenizers (cached by text, tokenizers and seq_len)."""
    text = corpus.split_text(corpus.load_documents(run.corpus), "crosscoder")
    key = io.config_hash({"text": hashlib.sha256(text.encode()).hexdigest(), "seq_len": run.corpus.seq_len,
                          "a": corpus.tokenizer_fingerprint(tok_a), "b": corpus.tokenizer_fingerprint(tok_b),
                          "max_tokens": run.harvest.max_tokens, "v": 1})
    cached = io.cache_root() / "tokens" / f"aligned-{key}.safetensors"
    try:
        t = io.load_tensors(cached)
    except io.ArtifactError:
        t = _align_corpus(text, tok_a, tok_b, run)
        io.save_tensors(cached, t)
    pos_a = _split(t["pos_a"], t["counts"])
    pos_b = _split(t["pos_b"], t["counts"])
    fraction = float(t["n_aligned"].item() / t["n_countable_a"].item())
    if fraction < run.harvest.min_aligned_fraction:
        warnings.warn(f"{run.name}: only {fraction:.1%} of {run.model_a}'s token positions pair up with "
                      f"{run.model_b}'s (threshold harvest.min_aligned_fraction = "
                      f"{run.harvest.min_aligned_fraction}); the crosscoder sees a biased sample of tokens",
                      stacklevel=2)
    return PairTokens(t["ids_a"], t["ids_b"], pos_a, pos_b, False, fraction)


def _split(flat: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(flat, counts.tolist()))


def _align_corpus(text: str, tok_a, tok_b, run: RunConfig) -> dict[str, torch.Tensor]:
    """Walk the text window by window; keep windows that fill a whole sequence on both sides."""
    seq_len = run.corpus.seq_len
    bos_a, bos_b = corpus.bos_id(tok_a), corpus.bos_id(tok_b)
    body_a, body_b = seq_len - (bos_a is not None), seq_len - (bos_b is not None)
    ids_a, ids_b, pos_a, pos_b, counts = [], [], [], [], []
    n_aligned = n_countable = 0
    start, window = 0, 8 * seq_len
    limit = run.harvest.max_tokens
    while start < len(text) and (limit is None or n_aligned < limit):
        chunk = token_alignment.align_text(text[start: start + window], tok_a, tok_b, run.model_a,
                                           run.model_b, max_tokens=max(body_a, body_b))
        if len(chunk.ids_a) < body_a or len(chunk.ids_b) < body_b:
            if start + window >= len(text):
                break  # the tail of the text cannot fill a sequence
            window *= 2
            continue
        keep = (chunk.pos_a < body_a) & (chunk.pos_b < body_b)
        ids_a.append(_with_bos(chunk.ids_a[:body_a], bos_a))
        ids_b.append(_with_bos(chunk.ids_b[:body_b], bos_b))
        pos_a.append(chunk.pos_a[keep] + (bos_a is not None))
        pos_b.append(chunk.pos_b[keep] + (bos_b is not None))
        counts.append(int(keep.sum()))
        n_aligned += counts[-1]
        n_countable += max(chunk.n_tokens_a, counts[-1])
        start += max(1, chunk.n_chars)
    if not ids_a:
        raise ValueError(f"corpus: the crosscoder part gives no full sequence of {seq_len} tokens for both "
                         f"{run.model_a} and {run.model_b}; use a larger corpus or a smaller corpus.seq_len")
    return {"ids_a": torch.stack(ids_a), "ids_b": torch.stack(ids_b), "pos_a": torch.cat(pos_a).long(),
            "pos_b": torch.cat(pos_b).long(), "counts": torch.tensor(counts, dtype=torch.long),
            "n_aligned": torch.tensor(n_aligned), "n_countable_a": torch.tensor(max(1, n_countable))}


def _with_bos(ids: list[int], bos: int | None) -> torch.Tensor:
    return torch.tensor(([bos] if bos is not None else []) + list(ids), dtype=torch.long)
