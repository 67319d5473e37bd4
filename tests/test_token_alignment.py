"""Tests for hidden_signatures.data.token_alignment on byte-level BPE tokenizers trained in the test."""

from __future__ import annotations

import pydoc_data.topics
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hidden_signatures.data.token_alignment import (AlignedChunk, align_positions, align_text, aligned_fraction,
                                               candidate_mask, same_tokenizer, token_end_offsets)

TOPICS = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
TRAIN_TEXT = TOPICS[:30_000]
# Prose plus multi-byte characters (split into byte pieces sharing one span) and odd spacing.
TEXT = TOPICS[40_000:43_000] + "\n\n  naïve café — 😀 déjà\tvu  end  "


def _bpe(vocab_size: int, trim_offsets: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer trained on TRAIN_TEXT (256-byte alphabet + merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    return tok


@pytest.fixture(scope="module")
def tok_small() -> PreTrainedTokenizerFast:
    """Vocab 300: many short tokens; offsets keep the leading space inside a token."""
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(300))


@pytest.fixture(scope="module")
def tok_large() -> PreTrainedTokenizerFast:
    """Vocab 700: longer tokens; offsets trimmed of the leading space (end offsets unchanged)."""
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(700, trim_offsets=True))


def _expected_pairs(ends_a: list[int], ws_a: list[bool], ends_b: list[int], ws_b: list[bool]) -> list[tuple]:
    """Brute force: shared end chars, each mapped to the last token ending there, whitespace dropped."""
    pairs = []
    for end in sorted(set(ends_a) & set(ends_b)):
        i = max(k for k, e in enumerate(ends_a) if e == end)
        j = max(k for k, e in enumerate(ends_b) if e == end)
        if not ws_a[i] and not ws_b[j]:
            pairs.append((i, j))
    return pairs


def test_trained_pair_aligns_exactly_the_shared_ends(tok_small, tok_large) -> None:
    ids_a, ends_a, ws_a = token_end_offsets(tok_small, TEXT, "small")
    ids_b, ends_b, ws_b = token_end_offsets(tok_large, TEXT, "large")
    assert len(tok_small) != len(tok_large) and len(ids_a) > len(ids_b) > 100
    assert len(set(ends_a)) < len(ends_a), "the test text should split some characters into byte pieces"
    idx_a, idx_b = align_positions(ends_a, ends_b, ws_a, ws_b)
    assert idx_a.dtype == torch.long and idx_b.dtype == torch.long
    pairs = list(zip(idx_a.tolist(), idx_b.tolist()))
    assert pairs == _expected_pairs(ends_a, ws_a, ends_b, ws_b)
    assert 0 < len(pairs) < len(ids_b)
    for i, j in pairs:
        prefix = TEXT[:ends_a[i]]
        assert tok_small.decode(ids_a[: i + 1]) == prefix
        assert tok_large.decode(ids_b[: j + 1]) == prefix


def test_align_text_matches_align_positions_without_truncation(tok_small, tok_large) -> None:
    chunk = align_text(TEXT, tok_small, tok_large, "small", "large", max_tokens=100_000)
    _, ends_a, ws_a = token_end_offsets(tok_small, TEXT, "small")
    _, ends_b, ws_b = token_end_offsets(tok_large, TEXT, "large")
    idx_a, idx_b = align_positions(ends_a, ends_b, ws_a, ws_b)
    assert torch.equal(chunk.pos_a, idx_a) and torch.equal(chunk.pos_b, idx_b)
    assert chunk.n_chars == len(TEXT)
    assert chunk.n_tokens_a == sum(1 for w in ws_a if not w)
    assert aligned_fraction(chunk.n_aligned, chunk.n_tokens_a) == chunk.n_aligned / chunk.n_tokens_a


def test_whitespace_skipping_off_keeps_whitespace_points(tok_small, tok_large) -> None:
    on = align_text(TEXT, tok_small, tok_large, "small", "large", max_tokens=100_000)
    off = align_text(TEXT, tok_small, tok_large, "small", "large", max_tokens=100_000, skip_whitespace=False)
    assert set(on.pos_a.tolist()) < set(off.pos_a.tolist())
    assert off.n_tokens_a == len(off.ids_a) > on.n_tokens_a


def test_identical_tokenizers_give_every_candidate_position(tok_small) -> None:
    ascii_text = TOPICS[50_000:52_000].encode("ascii", "ignore").decode()
    ids, ends, ws = token_end_offsets(tok_small, ascii_text, "small")
    idx_a, idx_b = align_positions(ends, ends, ws, ws)
    assert torch.equal(idx_a, idx_b)
    assert idx_a.tolist() == [i for i in range(len(ids)) if not ws[i]]
    # With byte-split characters, every position but the non-last byte pieces and whitespace.
    ids, ends, ws = token_end_offsets(tok_small, TEXT, "small")
    idx_a, _ = align_positions(ends, ends, ws, ws)
    expected = [i for i in range(len(ids)) if not ws[i] and (i + 1 == len(ids) or ends[i + 1] > ends[i])]
    assert idx_a.tolist() == expected and len(expected) < sum(1 for w in ws if not w)


def test_hand_written_ends_unbelievable() -> None:
    # "unbelievable things": A = un|believ|able, B = unbe|lieva|ble, both then t|h|i|n|g|s.
    ends_a = [2, 8, 12, 14, 15, 16, 17, 18, 19]
    ends_b = [4, 9, 12, 14, 15, 16, 17, 18, 19]
    idx_a, idx_b = align_positions(ends_a, ends_b)
    assert idx_a.tolist() == [2, 3, 4, 5, 6, 7, 8] and idx_b.tolist() == [2, 3, 4, 5, 6, 7, 8]
    # A whitespace-only token on one side removes that end from the alignment.
    ends_b_ws = [4, 9, 12, 13, 14, 15, 16, 17, 18, 19]
    ws_b = [False, False, False, True] + [False] * 6
    idx_a, idx_b = align_positions(ends_a, ends_b_ws, None, ws_b)
    assert idx_b.tolist() == [2, 4, 5, 6, 7, 8, 9]
    # Byte pieces sharing an end: only the last one is a candidate.
    assert candidate_mask([1, 3, 3, 3, 4]) == [True, False, False, True, True]


def _hand_bpe(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A BPE tokenizer with a hand-written vocabulary and merge list, split on whitespace."""
    vocab = {c: i for i, c in enumerate(sorted(set("unbelievable things")))}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_hand_built_tokenizers_unbelievable() -> None:
    tok_a = _hand_bpe([("u", "n"), ("b", "e"), ("be", "l"), ("bel", "i"), ("beli", "e"), ("belie", "v"),
                       ("a", "b"), ("ab", "l"), ("abl", "e")])
    tok_b = _hand_bpe([("u", "n"), ("un", "b"), ("unb", "e"), ("l", "i"), ("li", "e"), ("lie", "v"),
                       ("liev", "a"), ("b", "l"), ("bl", "e")])
    text = "unbelievable things"
    assert tok_a.convert_ids_to_tokens(tok_a(text)["input_ids"])[:3] == ["un", "believ", "able"]
    assert tok_b.convert_ids_to_tokens(tok_b(text)["input_ids"])[:3] == ["unbe", "lieva", "ble"]
    chunk = align_text(text, tok_a, tok_b, "a", "b", max_tokens=64)
    assert chunk.pos_a.tolist() == [2, 3, 4, 5, 6, 7, 8] and chunk.pos_b.tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert chunk.n_tokens_a == 9 and chunk.n_chars == len(text)
    assert aligned_fraction(chunk.n_aligned, chunk.n_tokens_a) == pytest.approx(7 / 9)


class _SlowTokenizer:
    """Stands in for a slow (pure Python) tokenizer: no offset mapping."""

    is_fast = False


class _RaisingTokenizer:
    """Claims to be fast but refuses offsets, as some wrappers do."""

    is_fast = True

    def __call__(self, *args, **kwargs):
        raise NotImplementedError("return_offset_mapping is not available")


@pytest.mark.parametrize("bad", [_SlowTokenizer(), _RaisingTokenizer()])
def test_tokenizer_without_offsets_is_named(bad, tok_small) -> None:
    with pytest.raises(ValueError, match=r"model gemma-x: its tokenizer has no offset mapping"):
        token_end_offsets(bad, "some text", "gemma-x")
    with pytest.raises(ValueError, match=r"model gemma-x:"):
        align_text("some text", tok_small, bad, "smol", "gemma-x", max_tokens=8)


def test_truncation_bounds_alignment_by_shorter_span(tok_small, tok_large) -> None:
    max_tokens = 120
    chunk = align_text(TEXT, tok_small, tok_large, "small", "large", max_tokens=max_tokens)
    _, ends_a, ws_a = token_end_offsets(tok_small, TEXT, "small")
    _, ends_b, ws_b = token_end_offsets(tok_large, TEXT, "large")
    assert len(chunk.ids_a) == len(chunk.ids_b) == max_tokens
    covered_a = ends_a[max_tokens - 1]
    assert covered_a < ends_b[max_tokens - 1], "A should be cut earlier in the text than B"
    assert chunk.n_chars <= covered_a
    ends_aligned = [ends_b[j] for j in chunk.pos_b.tolist()]
    assert all(e <= covered_a for e in ends_aligned)
    assert chunk.pos_b.max().item() < max_tokens and chunk.pos_a.max().item() < max_tokens
    full = _expected_pairs(ends_a, ws_a, ends_b, ws_b)
    kept = [p for p in full if ends_a[p[0]] <= covered_a]
    assert list(zip(chunk.pos_a.tolist(), chunk.pos_b.tolist())) == kept
    inside_b = [j for j in range(max_tokens) if ends_b[j] <= chunk.n_chars and not ws_b[j]]
    assert chunk.n_tokens_b == len(inside_b)
    assert chunk.n_tokens_b < max_tokens


def test_truncation_inside_a_byte_split_character(tok_small, tok_large) -> None:
    text = "The default implementation returns the object itself 😀 and more"
    _, ends_a, _ = token_end_offsets(tok_small, text, "small")
    _, ends_b, _ = token_end_offsets(tok_large, text, "large")
    emoji_end = text.index("😀") + 1
    first_a = ends_a.index(emoji_end)
    max_tokens = first_a + 2  # A keeps only two of the emoji's four byte pieces
    assert ends_a[first_a + 2] == emoji_end, "A should split the emoji into byte pieces"
    assert len(ends_b) - 1 - ends_b[::-1].index(emoji_end) < max_tokens, "B should keep the whole emoji"
    chunk = align_text(text, tok_small, tok_large, "small", "large", max_tokens=max_tokens)
    assert chunk.n_aligned > 0
    assert all(ends_a[i] < emoji_end for i in chunk.pos_a.tolist())
    assert chunk.n_chars < emoji_end


def test_same_tokenizer(tok_small, tok_large) -> None:
    copy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_small.backend_tokenizer.to_str()))
    copy.backend_tokenizer.enable_truncation(max_length=7)
    retrained = PreTrainedTokenizerFast(tokenizer_object=_bpe(300))
    assert same_tokenizer(tok_small, tok_small)
    assert same_tokenizer(tok_small, copy)
    assert same_tokenizer(tok_small, retrained)
    assert not same_tokenizer(tok_small, tok_large)
    trimmed = PreTrainedTokenizerFast(tokenizer_object=_bpe(300, trim_offsets=True))
    assert not same_tokenizer(tok_small, trimmed)  # same vocab, different pipeline


def test_validation_messages() -> None:
    with pytest.raises(ValueError, match="max_tokens must be a positive integer, got 0"):
        align_text("x", None, None, "a", "b", max_tokens=0)
    with pytest.raises(ValueError, match="n_tokens_a must be >= 1, got 0"):
        aligned_fraction(0, 0)
    with pytest.raises(ValueError, match=r"n_aligned must lie in \[0, 3\], got 4"):
        aligned_fraction(4, 3)
    with pytest.raises(ValueError, match="whitespace mask has 1 entries but there are 2 token ends"):
        candidate_mask([1, 2], [False])
