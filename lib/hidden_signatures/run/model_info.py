"""What the notebooks show of a model: its short name, its tokenizer, and a cached report of its size and
held-out loss."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .. import io
from ..data import corpus
from ..models import finetune
from ..models import loading as models
from .params import RunConfig

REPORTS_DIR = "model-reports"
"""Cache dir (under the cache root) of model_report results."""


def display_name(spec: str) -> str:
    """A short model name for tables and figures: packaged name, hub id, made model or dir name.

    Never a path: a made model of a local base reads `kind:<base dir name>`, so results written
    from two checkouts (or two machines) compare byte for byte.
    """
    path = Path(spec)
    if not path.is_dir():
        return spec
    try:
        info = io.read_json(path / "train_config.json").get("info", {})
        if "kind" in info and "base" in info:
            return f"{info['kind']}:{display_name(info['base'])}"
    except io.ArtifactError:
        pass
    return path.name


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.resolve_spec(spec), trust_remote_code=False)


def model_report(run: RunConfig, spec: str, max_seqs: int = 32,
                 text: corpus.CorpusConfig | None = None) -> dict:
    """Blocks, width, parameters and held-out next-token loss of a model (on the `heldout` part of
    `text`, by default the params' corpus).

    Cached by model files, corpus and device: pairs that share a model (most share SmolLM2-135M)
    measure it once.
    """
    device = models.pick_device(run.device)
    text = text or run.corpus
    cached = io.cache_root() / REPORTS_DIR / f"{_report_key(run, spec, max_seqs, device, text)}.json"
    if cached.exists():
        return io.read_json(cached)
    model, tok = models.load_model(spec, device=device, dtype=torch.float32)
    ids = corpus.tokenize_part(text, tok, "heldout")[:max_seqs]
    report = {"blocks": models.num_blocks(model), "width": models.hidden_size(model),
              "parameters (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
              "held-out loss": round(finetune.heldout_loss(model, ids, batch_size=8), 4),
              "held-out tokens": int(ids.numel())}
    io.write_json(cached, report)
    return report


def _report_key(run: RunConfig, spec: str, max_seqs: int, device: torch.device,
                text: corpus.CorpusConfig) -> str:
    """What a model report depends on: the model's name (or path; a made model's path relative to the
    cache) and files (name, size, mtime), the corpus, the device; not where the cache lies, so a moved
    cache keeps its reports."""
    path = Path(models.resolve_spec(spec))
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()) \
        if path.is_dir() else str(path)
    return io.config_hash({"model": _in_cache(spec), "files": files, "corpus": asdict(text),
                           "max_seqs": max_seqs, "device": device.type})


def _in_cache(spec: str) -> str:
    """A path spec inside the cache (a made model's built directory) as `cache:<relative path>`;
    any other spec unchanged."""
    try:
        return f"cache:{Path(spec).relative_to(io.cache_root()).as_posix()}"
    except ValueError:
        return spec
