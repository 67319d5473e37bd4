"""Text sources and tokenising into fixed-length sequences.

Sources (params `corpus.source`):
- `python-docs` (default, offline): `pydoc_data.topics` plus the docstrings longer than 200
  characters found by parsing (never importing) the standard library's .py files;
- `python-code` (offline): the same .py files with those docstrings cut out, one document per
  module: source code, text of another kind than the documentation (the fine-tune's domain);
- `hf:<dataset>[:<config>]`: a hub dataset's `text` column through `datasets`;
- a path to a local text file or a directory of .txt / .md files.

The documents are split deterministically by a hash of their text into parts (`crosscoder`,
`finetune`, `heldout`), so text used to fine-tune or distill a model is never seen by the
crosscoder. Sequences are `seq_len` tokens: BOS (when the tokenizer has one) then text tokens;
position 0 is never harvested.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import io

DEFAULT_SOURCE = "python-docs"
CODE_SOURCE = "python-code"
BUILTIN_SOURCES = (DEFAULT_SOURCE, CODE_SOURCE)
DOC_SEPARATOR = "\n\n"
MIN_DOCSTRING_CHARS = 200
# Fractions of documents (by text hash) in each part; the rest goes to the crosscoder.
PART_SHARES = {"finetune": 0.2, "heldout": 0.1}
PARTS = ("crosscoder", "finetune", "heldout", "all")


@dataclass
class CorpusConfig:
    """Where the text comes from and how it is cut into sequences."""

    source: str = DEFAULT_SOURCE
    """python-docs, hf:<dataset>[:<config>], or a path to a text file / directory."""
    seq_len: int = 256
    """Tokens per sequence, BOS included."""
    max_chars: int | None = None
    """Cap on characters read from the source (None: all of it; hub datasets need a cap)."""

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            raise ValueError(f"corpus.seq_len: {self.seq_len!r} must be an integer >= 8")
        if self.max_chars is not None and (not isinstance(self.max_chars, int) or self.max_chars <= 0):
            raise ValueError(f"corpus.max_chars: {self.max_chars!r} must be a positive integer or null")
        check_source(self.source)


def check_source(source: str) -> None:
    """Validate a source string cheaply (existence of local files), before heavy work."""
    if source in BUILTIN_SOURCES or source.startswith("hf:"):
        if source.startswith("hf:") and len(source) <= 3:
            raise ValueError("corpus.source: 'hf:' needs a dataset name, e.g. hf:openwebtext")
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"corpus.source: {source!r} is not python-docs, python-code, hf:<dataset>, "
                         "or an existing file or directory")
    if path.is_dir() and not _text_files(path):
        raise ValueError(f"corpus.source: directory {source!r} holds no .txt or .md files")
    if path.is_file():
        try:
            with open(path, encoding="utf-8") as fh:
                fh.read(1024)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"corpus.source: cannot read {source!r} as UTF-8 text ({exc})") from None


# -- documents ---------------------------------------------------------------------------

def python_docs() -> list[str]:
    """Python's own documentation: pydoc topics + long stdlib docstrings, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    docs += stdlib_docstrings()
    return [d for d in docs if d]


def _stdlib_modules() -> list[tuple[str, ast.Module]]:
    """(source, parsed tree) of every stdlib .py file outside tests and bundled packages, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    out = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            out.append((text, ast.parse(text)))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
    return out


DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
"""The nodes that can carry a docstring."""


def _docstring_nodes(tree: ast.Module):
    """The docstring expression of every module, class and function in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, DOC_OWNERS) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                yield first


def stdlib_docstrings(min_chars: int = MIN_DOCSTRING_CHARS) -> list[str]:
    """Docstrings longer than `min_chars` from the stdlib sources, parsed with ast (no imports)."""
    out: list[str] = []
    for _, tree in _stdlib_modules():
        for node in ast.walk(tree):
            if isinstance(node, DOC_OWNERS):
                doc = ast.get_docstring(node)
                if doc and len(doc) > min_chars:
                    out.append(doc.strip())
    return list(dict.fromkeys(out))  # drop repeats, keep order


def stdlib_code(min_chars: int = MIN_DOCSTRING_CHARS) -> list[str]:
    """Each stdlib module's source with every docstring cut out (whole lines), comments kept."""
    docs = []
    for text, tree in _stdlib_modules():
        lines = text.splitlines()
        drop = set()
        for node in _docstring_nodes(tree):
            drop.update(range(node.lineno - 1, node.end_lineno))
        code = "\n".join(line for i, line in enumerate(lines) if i not in drop).strip()
        if len(code) > min_chars:
            docs.append(code)
    return list(dict.fromkeys(docs))


def _text_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())


def local_docs(path: Path) -> list[str]:
    """Documents from a text file (split on blank lines) or a directory (one per file)."""
    if path.is_dir():
        return [p.read_text(encoding="utf-8").strip() for p in _text_files(path)]
    text = path.read_text(encoding="utf-8")
    return [d.strip() for d in text.split(DOC_SEPARATOR) if d.strip()]


def hub_docs(name: str, max_chars: int | None) -> list[str]:
    """Documents from a hub dataset's text column, streamed up to max_chars."""
    from datasets import load_dataset

    dataset, _, config = name.partition(":")
    stream = load_dataset(dataset, config or None, split="train", streaming=True)
    docs, total = [], 0
    limit = max_chars or 50_000_000
    for row in stream:
        text = row.get("text") or ""
        docs.append(text.strip())
        total += len(text)
        if total >= limit:
            break
    return [d for d in docs if d]


def load_documents(cfg: CorpusConfig) -> list[str]:
    """All documents of the configured source, cached as text under the cache root."""
    key = io.config_hash({"source": cfg.source, "max_chars": cfg.max_chars,
                          "python": sys.version_info[:2] if cfg.source in BUILTIN_SOURCES else None,
                          "files": _local_fingerprint(cfg.source)})
    cached = io.cache_root() / "corpus" / f"{key}.json"
    if cached.exists():
        try:
            return io.read_json(cached)
        except io.ArtifactError:
            pass  # corrupt cache: rebuild below
    if cfg.source == DEFAULT_SOURCE:
        docs = python_docs()
    elif cfg.source == CODE_SOURCE:
        docs = stdlib_code()
    elif cfg.source.startswith("hf:"):
        docs = hub_docs(cfg.source[3:], cfg.max_chars)
    else:
        docs = local_docs(Path(cfg.source).expanduser())
    if cfg.max_chars:
        docs = _cap_chars(docs, cfg.max_chars)
    io.write_json(cached, docs)
    return docs


def _local_fingerprint(source: str) -> list[tuple[str, str]] | None:
    """Content hashes of a local source's files, so an edited file is never served from the cache."""
    if source in BUILTIN_SOURCES or source.startswith("hf:"):
        return None
    path = Path(source).expanduser()
    files = _text_files(path) if path.is_dir() else [path]
    return [(str(p.relative_to(path)) if path.is_dir() else p.name, io.file_sha256(p)) for p in files]


def _cap_chars(docs: list[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        out.append(doc[: max_chars - total])
        total += len(out[-1])
    return out


def part_of(doc: str) -> str:
    """Which part a document belongs to, from a hash of its text (stable across runs)."""
    u = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2**64
    edge = 0.0
    for part, share in PART_SHARES.items():
        edge += share
        if u < edge:
            return part
    return "crosscoder"


def split_text(docs: list[str], part: str) -> str:
    """The text of one part (or `all`), documents joined by a blank line."""
    if part not in PARTS:
        raise ValueError(f"corpus part {part!r}: accepted: {', '.join(PARTS)}")
    chosen = docs if part == "all" else [d for d in docs if part_of(d) == part]
    return DOC_SEPARATOR.join(chosen)


# -- tokenising --------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """A hash identifying a tokenizer's behaviour (vocab + normaliser + specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((text + repr(tokenizer.bos_token_id)).encode("utf-8")).hexdigest()[:16]


def bos_id(tokenizer) -> int | None:
    """The BOS id to prepend, or None when the tokenizer has none."""
    return tokenizer.bos_token_id


def chunk_ids(ids: list[int], seq_len: int, bos: int | None, max_seqs: int | None = None) -> torch.Tensor:
    """Cut a token stream into [S, seq_len] sequences, each starting with BOS when there is one."""
    body = seq_len - (1 if bos is not None else 0)
    n_seq = len(ids) // body
    if max_seqs is not None:
        n_seq = min(n_seq, max_seqs)
    if n_seq == 0:
        raise ValueError(f"corpus: text gives {len(ids)} tokens, fewer than one sequence of "
                         f"{seq_len}; use a larger corpus or a smaller corpus.seq_len")
    seqs = torch.tensor(ids[: n_seq * body], dtype=torch.long).view(n_seq, body)
    if bos is not None:
        seqs = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), seqs], dim=1)
    return seqs


def tokenize_part(cfg: CorpusConfig, tokenizer, part: str = "crosscoder") -> torch.Tensor:
    """Token sequences [S, seq_len] of one corpus part for one tokenizer, cached by content hash."""
    docs = load_documents(cfg)
    text = split_text(docs, part)
    key = io.config_hash({"text": hashlib.sha256(text.encode()).hexdigest(), "seq_len": cfg.seq_len,
                          "tok": tokenizer_fingerprint(tokenizer)})
    cached = io.cache_root() / "tokens" / f"{key}.safetensors"
    if cached.exists():
        try:
            return io.load_tensors(cached)["ids"]
        except io.ArtifactError:
            pass
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seqs = chunk_ids(ids, cfg.seq_len, bos_id(tokenizer))
    io.save_tensors(cached, {"ids": seqs})
    return seqs
