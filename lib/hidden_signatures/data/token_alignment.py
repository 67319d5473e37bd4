"""Align the token positions of two models whose tokenizers differ, on character offsets.

Both tokenizers (HF fast tokenizers) tokenise the same text, without special tokens, with
``return_offsets_mapping=True``. Only each token's END character offset is used, because
tokenizers disagree on whether a leading space ('Ġ' in byte-level BPE, '▁' in SentencePiece
style) is inside a token's span, while the end is the same either way.

Rules (what makes position i of a token list an alignment *candidate*):
  1. it is the LAST token ending at its character: byte-fallback pieces of one character
     share that character's span, and only after the last piece has the model seen the whole
     character (formally: ends[i] >= every earlier end and < every later end);
  2. when whitespace skipping is on, its token text ``text[start:end]`` is not whitespace only
     (empty spans count as whitespace): a whitespace-only token is never an alignment point,
     on either side.
A candidate of A and a candidate of B are an aligned pair when they end at the same
character: both models have then read exactly ``text[:end]``. Identical tokenizers therefore
align every candidate position (every non-whitespace position when no character is split
into byte pieces).

Positions returned here index the token lists WITHOUT BOS: a caller that prepends BOS to
each sequence must add one to ``pos_a`` / ``pos_b``.

Aligned fraction: aligned pairs / tokens of model A within the span both truncated sequences
cover (``AlignedChunk.n_tokens_a``), not counting whitespace-only tokens when skipping is on.
It is the share of model A's positions whose activation reaches the store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class AlignedChunk:
    """One text chunk tokenised by both models, with the positions that pair up."""

    ids_a: list[int]
    """Token ids of model A (no BOS), at most ``max_tokens`` long."""
    ids_b: list[int]
    """Token ids of model B (no BOS), at most ``max_tokens`` long."""
    pos_a: torch.Tensor
    """[P] long: aligned positions within ``ids_a`` (add 1 after prepending BOS)."""
    pos_b: torch.Tensor
    """[P] long: aligned positions within ``ids_b``, pair for pair with ``pos_a``."""
    n_tokens_a: int
    """Tokens of A inside the covered span (whitespace-only ones excluded when skipping)."""
    n_tokens_b: int
    """Tokens of B inside the covered span (whitespace-only ones excluded when skipping)."""
    n_chars: int
    """Characters of the text both truncated sequences have read completely (the covered span)."""

    @property
    def n_aligned(self) -> int:
        """Number of aligned pairs."""
        return int(self.pos_a.numel())


def token_end_offsets(tokenizer, text: str, name: str) -> tuple[list[int], list[int], list[bool]]:
    """Token ids, end character offsets and whitespace-only flags of `text` (no special tokens)."""
    no_offsets = ValueError(f"model {name}: its tokenizer has no offset mapping (a fast tokenizer "
                            "is needed to align pairs whose tokenizers differ)")
    if not getattr(tokenizer, "is_fast", False):
        raise no_offsets
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError as err:
        raise no_offsets from err
    ids = [int(i) for i in enc["input_ids"]]
    offsets = enc.get("offset_mapping")
    if offsets is None or len(offsets) != len(ids):
        raise no_offsets
    ends = [int(end) for _, end in offsets]
    is_ws = [not text[int(start):int(end)].strip() for start, end in offsets]
    return ids, ends, is_ws


def candidate_mask(ends: Sequence[int], is_ws: Sequence[bool] | None = None) -> list[bool]:
    """Positions that may be alignment points: last token ending at its char, not whitespace-only."""
    n = len(ends)
    if is_ws is not None and len(is_ws) != n:
        raise ValueError(f"whitespace mask has {len(is_ws)} entries but there are {n} token ends")
    mask = [False] * n
    later_min = float("inf")
    for i in range(n - 1, -1, -1):
        mask[i] = ends[i] < later_min
        later_min = min(later_min, ends[i])
    earlier_max = -1
    for i in range(n):
        if ends[i] < earlier_max or (is_ws is not None and is_ws[i]):
            mask[i] = False
        earlier_max = max(earlier_max, ends[i])
    return mask


def _merge(ends_a: Sequence[int], mask_a: Sequence[bool],
           ends_b: Sequence[int], mask_b: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-pointer merge of the candidates of A and B (strictly increasing ends) on equal ends."""
    cand_a = [i for i, keep in enumerate(mask_a) if keep]
    cand_b = [i for i, keep in enumerate(mask_b) if keep]
    idx_a: list[int] = []
    idx_b: list[int] = []
    i = j = 0
    while i < len(cand_a) and j < len(cand_b):
        end_a, end_b = ends_a[cand_a[i]], ends_b[cand_b[j]]
        if end_a == end_b:
            idx_a.append(cand_a[i])
            idx_b.append(cand_b[j])
        i += end_a <= end_b
        j += end_b <= end_a
    return torch.tensor(idx_a, dtype=torch.long), torch.tensor(idx_b, dtype=torch.long)


def align_positions(ends_a: Sequence[int], ends_b: Sequence[int], ws_a: Sequence[bool] | None = None,
                    ws_b: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into A's and B's token lists where both end a token at the same character, O(n)."""
    return _merge(ends_a, candidate_mask(ends_a, ws_a), ends_b, candidate_mask(ends_b, ws_b))


def _covered_chars(ends: Sequence[int], mask_all: Sequence[bool], n_kept: int) -> int:
    """Characters fully read by the first `n_kept` tokens: the end of the last candidate kept."""
    for i in range(n_kept - 1, -1, -1):
        if mask_all[i]:
            return ends[i]
    return 0


def align_text(text: str, tok_a, tok_b, name_a: str, name_b: str, max_tokens: int,
               skip_whitespace: bool = True) -> AlignedChunk:
    """Tokenise `text` with both tokenizers, keep at most `max_tokens` each, and pair positions.

    Candidates are decided on the full tokenisation (so a cut inside a byte-split character
    never makes a partial piece a candidate), then limited to the kept tokens and to the span
    both kept sequences cover. No BOS is added (see the module docstring).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens}")
    ids_a, ends_a, ws_a = token_end_offsets(tok_a, text, name_a)
    ids_b, ends_b, ws_b = token_end_offsets(tok_b, text, name_b)
    n_a, n_b = min(len(ids_a), max_tokens), min(len(ids_b), max_tokens)
    n_chars = min(_covered_chars(ends_a, candidate_mask(ends_a), n_a),
                  _covered_chars(ends_b, candidate_mask(ends_b), n_b))
    mask_a = candidate_mask(ends_a, ws_a if skip_whitespace else None)[:n_a]
    mask_b = candidate_mask(ends_b, ws_b if skip_whitespace else None)[:n_b]
    pos_a, pos_b = _merge(ends_a, mask_a, ends_b, mask_b)
    return AlignedChunk(
        ids_a=ids_a[:n_a], ids_b=ids_b[:n_b], pos_a=pos_a, pos_b=pos_b,
        n_tokens_a=_count_inside(ends_a[:n_a], ws_a if skip_whitespace else None, n_chars),
        n_tokens_b=_count_inside(ends_b[:n_b], ws_b if skip_whitespace else None, n_chars),
        n_chars=n_chars)


def _count_inside(ends: Sequence[int], is_ws: Sequence[bool] | None, n_chars: int) -> int:
    """Tokens ending inside the covered span, whitespace-only ones excluded when a mask is given."""
    return sum(1 for i, end in enumerate(ends) if end <= n_chars and not (is_ws is not None and is_ws[i]))


def aligned_fraction(n_aligned: int, n_tokens_a: int) -> float:
    """Aligned pairs / model A's tokens in the covered span (see the module docstring)."""
    if n_tokens_a < 1:
        raise ValueError(f"aligned_fraction: n_tokens_a must be >= 1, got {n_tokens_a}")
    if not 0 <= n_aligned <= n_tokens_a:
        raise ValueError(f"aligned_fraction: n_aligned must lie in [0, {n_tokens_a}], got {n_aligned}")
    return n_aligned / n_tokens_a


def _backend_json(tokenizer) -> str | None:
    """The backend tokenizer's JSON without truncation/padding settings, or None when absent."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True)


def same_tokenizer(tok_a, tok_b) -> bool:
    """True when both tokenizers share vocab, backend pipeline (normaliser etc.) and BOS id."""
    if tok_a is tok_b:
        return True
    if tok_a.get_vocab() != tok_b.get_vocab():
        return False
    if getattr(tok_a, "bos_token_id", None) != getattr(tok_b, "bos_token_id", None):
        return False
    json_a, json_b = _backend_json(tok_a), _backend_json(tok_b)
    return json_a is not None and json_a == json_b
