"""Tests for corpus.py: deterministic parts, chunking, token caching, local sources, docstrings."""

from __future__ import annotations

import sys
import sysconfig
from collections import Counter

import pytest
import torch

from hidden_signatures import io
from hidden_signatures.data import corpus


class CountingTokenizer:
    """Delegates to a real tokenizer and counts how often it tokenises text."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


# -- parts -----------------------------------------------------------------------------------------
def test_part_of_is_deterministic_and_follows_shares() -> None:
    docs = [f"document number {i}: some text about topic {i % 7}" for i in range(6000)]
    parts = [corpus.part_of(d) for d in docs]
    assert parts == [corpus.part_of(d) for d in docs]
    shares = {p: n / len(docs) for p, n in Counter(parts).items()}
    expected = dict(corpus.PART_SHARES, crosscoder=1 - sum(corpus.PART_SHARES.values()))
    assert set(shares) == set(expected)
    for part, share in expected.items():
        assert abs(shares[part] - share) < 0.025, (part, shares[part], share)


def test_part_of_known_value_is_stable_across_runs() -> None:
    # sha256 of the text decides, so the answer cannot depend on PYTHONHASHSEED or process.
    import hashlib
    doc = "A fixed document."
    u = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big") / 2**64
    expected = "finetune" if u < 0.2 else "heldout" if u < 0.3 else "crosscoder"
    assert corpus.part_of(doc) == expected


def test_split_text_parts_are_disjoint_and_cover_all() -> None:
    docs = [f"doc {i} " + "word " * (i % 5) for i in range(400)]
    split = {p: corpus.split_text(docs, p).split(corpus.DOC_SEPARATOR) for p in corpus.PARTS}
    named = [set(split[p]) for p in ("crosscoder", "finetune", "heldout")]
    assert all(named)
    assert not (named[0] & named[1]) and not (named[0] & named[2]) and not (named[1] & named[2])
    assert named[0] | named[1] | named[2] == set(docs)
    assert split["all"] == docs


def test_split_text_unknown_part() -> None:
    with pytest.raises(ValueError, match="corpus part 'train': accepted: crosscoder, finetune, heldout, all"):
        corpus.split_text(["x"], "train")


# -- chunking --------------------------------------------------------------------------------------
def test_chunk_ids_puts_bos_first() -> None:
    ids = list(range(10, 60))  # 50 tokens, body 7 per sequence -> 7 sequences
    seqs = corpus.chunk_ids(ids, seq_len=8, bos=1)
    assert seqs.shape == (7, 8) and seqs.dtype == torch.long
    assert torch.all(seqs[:, 0] == 1)
    assert seqs[:, 1:].reshape(-1).tolist() == ids[:49]


def test_chunk_ids_without_bos_and_capped() -> None:
    ids = list(range(100))
    seqs = corpus.chunk_ids(ids, seq_len=8, bos=None)
    assert seqs.shape == (12, 8) and seqs.reshape(-1).tolist() == ids[:96]
    assert corpus.chunk_ids(ids, seq_len=8, bos=None, max_seqs=3).shape == (3, 8)


def test_chunk_ids_too_short_text() -> None:
    with pytest.raises(ValueError, match="text gives 6 tokens, fewer than one sequence of 8"):
        corpus.chunk_ids(list(range(6)), seq_len=8, bos=0)


def test_tokenize_part_too_short_corpus(isolated_roots, tiny_tokenizer) -> None:
    path = isolated_roots / "short.txt"
    path.write_text("Too short.", encoding="utf-8")
    cfg = corpus.CorpusConfig(source=str(path), seq_len=64)
    with pytest.raises(ValueError, match="fewer than one sequence of 64.*smaller corpus.seq_len"):
        corpus.tokenize_part(cfg, tiny_tokenizer, "all")


# -- tokenize_part caching -------------------------------------------------------------------------
def test_tokenize_part_caches_and_rebuilds_corrupt_cache(isolated_roots, tiny_tokenizer, text_file) -> None:
    tok = CountingTokenizer(tiny_tokenizer)
    cfg = corpus.CorpusConfig(source=str(text_file), seq_len=16)
    first = corpus.tokenize_part(cfg, tok, "all")
    assert tok.calls == 1
    assert first.shape[1] == 16 and first.shape[0] > 10
    assert torch.all(first[:, 0] == tiny_tokenizer.bos_token_id)

    second = corpus.tokenize_part(cfg, tok, "all")
    assert tok.calls == 1  # loaded from the cache, not tokenised again
    assert torch.equal(first, second)

    cached = list((isolated_roots / "cache" / "tokens").glob("*.safetensors"))
    assert len(cached) == 1
    cached[0].write_bytes(b"not a safetensors file")
    third = corpus.tokenize_part(cfg, tok, "all")
    assert tok.calls == 2  # rebuilt
    assert torch.equal(first, third)
    assert torch.equal(io.load_tensors(cached[0])["ids"], first)


def test_tokenize_part_keys_on_part_and_seq_len(isolated_roots, tiny_tokenizer, text_file) -> None:
    cfg16 = corpus.CorpusConfig(source=str(text_file), seq_len=16)
    cfg32 = corpus.CorpusConfig(source=str(text_file), seq_len=32)
    all16 = corpus.tokenize_part(cfg16, tiny_tokenizer, "all")
    all32 = corpus.tokenize_part(cfg32, tiny_tokenizer, "all")
    part16 = corpus.tokenize_part(cfg16, tiny_tokenizer, "crosscoder")
    assert all32.shape[1] == 32 and part16.shape[0] < all16.shape[0]
    assert len(list((isolated_roots / "cache" / "tokens").glob("*.safetensors"))) == 3


# -- local sources ---------------------------------------------------------------------------------
def test_local_file_documents_split_on_blank_lines(isolated_roots) -> None:
    path = isolated_roots / "docs.txt"
    path.write_text("first doc\nstill first\n\n\n second doc \n\nthird", encoding="utf-8")
    assert corpus.local_docs(path) == ["first doc\nstill first", "second doc", "third"]
    assert corpus.load_documents(corpus.CorpusConfig(source=str(path))) == corpus.local_docs(path)


def test_local_directory_documents_one_per_text_file(isolated_roots) -> None:
    folder = isolated_roots / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee\n\nstill bee", encoding="utf-8")
    (folder / "a.md").write_text(" # a ", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (folder / "ignored.py").write_text("print('no')", encoding="utf-8")
    assert corpus.local_docs(folder) == ["# a", "bee\n\nstill bee", "sea"]


def test_load_documents_caps_characters(isolated_roots, text_file) -> None:
    docs = corpus.load_documents(corpus.CorpusConfig(source=str(text_file), max_chars=1000))
    assert sum(len(d) for d in docs) == 1000
    full = corpus.load_documents(corpus.CorpusConfig(source=str(text_file)))
    assert docs[:-1] == full[: len(docs) - 1] and full[len(docs) - 1].startswith(docs[-1])


def test_load_documents_rebuilds_a_corrupt_cache(isolated_roots, text_file) -> None:
    cfg = corpus.CorpusConfig(source=str(text_file))
    docs = corpus.load_documents(cfg)
    (cached,) = (isolated_roots / "cache" / "corpus").glob("*.json")
    cached.write_text("{truncated", encoding="utf-8")
    assert corpus.load_documents(cfg) == docs


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: str(tmp / "missing.txt"), "is not python-docs, python-code, hf:<dataset>, or an existing file"),
    (lambda tmp: str(tmp), "holds no .txt or .md files"),
    (lambda tmp: "hf:", "'hf:' needs a dataset name"),
])
def test_check_source_errors(make, needle, tmp_path) -> None:
    with pytest.raises(ValueError, match="^corpus.source: ") as err:
        corpus.check_source(make(tmp_path))
    assert needle in str(err.value)


def test_check_source_rejects_binary_file(tmp_path) -> None:
    path = tmp_path / "blob.txt"
    path.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(ValueError, match="cannot read .* as UTF-8 text"):
        corpus.check_source(str(path))


def test_check_source_accepts_known_forms(text_file) -> None:
    for source in ("python-docs", "hf:openwebtext", str(text_file), str(text_file.parent)):
        corpus.check_source(source)


@pytest.mark.parametrize("kwargs, needle", [
    ({"seq_len": 4}, "corpus.seq_len: 4 must be an integer >= 8"),
    ({"seq_len": 16.0}, "corpus.seq_len: 16.0"),
    ({"max_chars": 0}, "corpus.max_chars: 0 must be a positive integer or null"),
])
def test_corpus_config_validates(kwargs, needle) -> None:
    with pytest.raises(ValueError) as err:
        corpus.CorpusConfig(**kwargs)
    assert needle in str(err.value)


# -- the offline default -----------------------------------------------------------------------------
def test_stdlib_docstrings_parses_without_importing(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    long_doc = "Module documentation. " * 12
    root = tmp_path / "lib"
    for sub in ("pkg", "site-packages", "test"):
        (root / sub).mkdir(parents=True)
    (root / "pkg" / "boom.py").write_text(
        f'"""{long_doc}"""\nopen({str(marker)!r}, "w").close()\nraise SystemExit("imported")\n\n'
        f'def f():\n    """{"Function documentation. " * 10}"""\n\n'
        f'def short():\n    """Too short to keep."""\n', encoding="utf-8")
    (root / "pkg" / "copy.py").write_text(f'"""{long_doc}"""\n', encoding="utf-8")  # a repeat
    (root / "pkg" / "broken.py").write_text("def (:\n", encoding="utf-8")
    (root / "site-packages" / "third.py").write_text(f'"""{"Third party. " * 30}"""\n', encoding="utf-8")
    (root / "test" / "t.py").write_text(f'"""{"Test text. " * 30}"""\n', encoding="utf-8")
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(root)})
    docs = corpus.stdlib_docstrings()
    assert docs == [long_doc.strip(), ("Function documentation. " * 10).strip()]
    assert not marker.exists() and "boom" not in sys.modules


def test_stdlib_docstrings_real_stdlib() -> None:
    before = set(sys.modules)
    docs = corpus.stdlib_docstrings()
    assert len(docs) > 100
    assert all(len(d) > corpus.MIN_DOCSTRING_CHARS for d in docs)
    assert len(set(docs)) == len(docs)
    assert not {"this", "antigravity", "turtle", "tkinter", "idlelib"} & (set(sys.modules) - before)


def test_stdlib_code_cuts_every_docstring_and_keeps_code_and_comments(tmp_path, monkeypatch) -> None:
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}  # comment {i}" for i in range(30))
    (root / "pkg" / "mod.py").write_text(
        '"""Module doc\nover two lines."""\nimport os\n\n\nclass K:\n    """Class doc."""\n\n'
        f'    def m(self):\n        """Method doc."""\n        return 1\n\n\ndef f():\n{body}\n', encoding="utf-8")
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(root)})
    [code] = corpus.stdlib_code()
    assert "doc" not in code.lower() and "import os" in code and "# comment 29" in code
    assert "class K:" in code and "return 1" in code
    compile(code, "mod.py", "exec")  # still valid Python once the docstrings are gone


def test_code_and_docs_sources_share_no_document(isolated_roots) -> None:
    code = corpus.load_documents(corpus.CorpusConfig(source=corpus.CODE_SOURCE))
    docs = corpus.load_documents(corpus.CorpusConfig(source=corpus.DEFAULT_SOURCE))
    assert len(code) > 300 and not set(code) & set(docs)
    assert sum("def " in c for c in code) > 0.5 * len(code)


def test_load_documents_sees_an_edited_local_file(isolated_roots) -> None:
    path = isolated_roots / "docs.txt"
    path.write_text("old text\n\nold second", encoding="utf-8")
    cfg = corpus.CorpusConfig(source=str(path))
    assert corpus.load_documents(cfg) == ["old text", "old second"]
    path.write_text("new text\n\nnew second", encoding="utf-8")  # same size: only the content differs
    assert corpus.load_documents(cfg) == ["new text", "new second"]
