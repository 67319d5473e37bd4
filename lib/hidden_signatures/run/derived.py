"""Models made here from a base model: fine-tuned and distilled variants, built once and cached.

A params file may name, as model_a or model_b,
- `finetune:<base>`: <base> fine-tuned with the LM loss on the corpus's `finetune` part;
- `distill-kl:<base>` / `distill-jacobian:<base>`: a half-depth student of <base> trained on the
  same part with the KL objective, or KL plus Jacobian matching.
Settings come from the params' `finetune:` / `distill:` sections; their `corpus:` key (a corpus
source, e.g. python-code) trains on another text than the crosscoder's, by default the same source.
The result is a plain HF
directory under <cache>/derived/<kind>-<hash of base, data and settings>/model, which any
params file can also name directly as a local directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from .. import io, precision
from ..data import corpus
from ..harvest.activations import model_identity
from ..models import distill, finetune, lm_training
from ..models import loading as models
from ..models.distill import DistillConfig
from .model_info import load_tokenizer, model_report
from .params import ParamsError, RunConfig

KINDS = ("finetune", "distill-kl", "distill-jacobian")
TRAIN_PART = "finetune"
EVAL_PART = "heldout"
CURVE_SEQS = 16
"""Held-out sequences per point of a made model's learning curve."""


def parse(spec: str) -> tuple[str, str] | None:
    """(kind, base) for a derived spec, None for an ordinary one."""
    kind, sep, base = spec.partition(":")
    if sep and kind in KINDS:
        return kind, base
    return None


def is_derived(spec: str) -> bool:
    return parse(spec) is not None


def _section(run: RunConfig, kind: str) -> tuple[dict, str]:
    return (run.finetune, "finetune") if kind == "finetune" else (run.distill, "distill")


def train_corpus(run: RunConfig, kind: str) -> corpus.CorpusConfig:
    """The corpus a derived model trains on: the section's `corpus:` source, else the params' corpus."""
    raw, name = _section(run, kind)
    source = raw.get("corpus", run.corpus.source)
    try:
        return dataclasses.replace(run.corpus, source=source)
    except ValueError as exc:
        raise ParamsError(f"{name}.{exc}") from None


def train_config(run: RunConfig, kind: str):
    """The validated LMTrainConfig (fine-tune) or DistillConfig (distill-*) from the params."""
    cls = lm_training.LMTrainConfig if kind == "finetune" else DistillConfig
    raw, name = _section(run, kind)
    raw = {k: v for k, v in raw.items() if k != "corpus"}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        import difflib
        close = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; accepted: {', '.join(sorted(fields))}"
        raise ParamsError(f"{name}.{unknown[0]}: unknown key{hint}")
    try:
        cfg = cls(**raw)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"{name}: {exc}") from None
    return _resolved(cfg, run)


def _resolved(cfg, run: RunConfig):
    """The config with `autocast_dtype: auto` replaced by this device's precision (so the cache key names it)."""
    if cfg.autocast_dtype != precision.AUTO:
        return cfg
    try:
        device = models.pick_device(run.device)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    return dataclasses.replace(cfg, autocast_dtype=precision.resolve(precision.AUTO, device))


def shape(run: RunConfig, spec: str) -> tuple[int, int]:
    """(blocks, width) of a derived model without building it."""
    kind, base = parse(spec)
    blocks, width = models.model_shape(base)
    if kind.startswith("distill"):
        try:
            blocks = len(distill.student_block_ids(blocks, train_config(run, kind).student_blocks))
        except ValueError as exc:  # a named start outside the teacher
            raise ParamsError(f"distill.{exc}") from None
    return blocks, width


def check(run: RunConfig, spec: str) -> None:
    """Validate a derived spec and its settings cheaply."""
    kind, base = parse(spec)
    if is_derived(base):
        raise ParamsError(f"model {spec}: the base of a derived model must be an ordinary model")
    models.check_spec(base)
    train_config(run, kind)
    train_corpus(run, kind)
    shape(run, spec)  # a student's start against its teacher


def train_tokens(run: RunConfig, base: str, kind: str, part: str = TRAIN_PART):
    """The base tokenizer's sequences of a part of the training corpus (never the crosscoder's part)."""
    return corpus.tokenize_part(train_corpus(run, kind), load_tokenizer(base), part)


def directory(run: RunConfig, spec: str) -> Path:
    """<cache>/derived/<kind>-<key>: keyed by base identity, training data and settings."""
    kind, base = parse(spec)
    ids = train_tokens(run, base, kind)
    data = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    key = io.config_hash({"kind": kind, "base": model_identity(base), "data": data,
                          "cfg": lm_training.key_dict(train_config(run, kind))})
    return io.cache_root() / "derived" / f"{kind}-{key}"


def build(run: RunConfig, spec: str) -> Path:
    """Train (or reuse) a derived model; returns its HF directory."""
    kind, base = parse(spec)
    out = directory(run, spec)
    with io.file_lock(out):  # two runs building the same model: the second waits, then reuses it
        if lm_training.is_complete(out):
            return lm_training.model_dir(out)
        return _train(run, kind, base, out)


def _train(run: RunConfig, kind: str, base: str, out: Path) -> Path:
    """Train one derived model into `out` (resuming from its last checkpoint)."""
    cfg = train_config(run, kind)
    model, tok = models.load_model(base, device=models.pick_device(run.device), dtype=_fp32())
    ids = train_tokens(run, base, kind)
    info = {"base": base, "kind": kind, "corpus": train_corpus(run, kind).source, "train_part": TRAIN_PART,
            "sequences": int(ids.shape[0])}
    own = train_tokens(run, base, kind, EVAL_PART)[:CURVE_SEQS]
    if kind == "finetune":
        model.requires_grad_(True)
        crosscoder_text = corpus.tokenize_part(run.corpus, tok, EVAL_PART)[:CURVE_SEQS]
        heldout = {"domain": own, "crosscoder_text": crosscoder_text}
        return finetune.finetune(model, tok, ids, cfg, out, info=info, heldout=heldout)
    objective = "kl" if kind == "distill-kl" else "kl_jacobian"
    return distill.distill(model, tok, ids, cfg, objective, out, info=info, heldout_NT=own)


def _fp32():
    import torch
    return torch.float32


def materialize(run: RunConfig, build_missing: bool = True) -> RunConfig:
    """A copy of `run` whose derived model specs are replaced by their built directories."""
    specs = {}
    for field in ("model_a", "model_b"):
        spec = getattr(run, field)
        if not is_derived(spec):
            continue
        out = directory(run, spec)
        if not lm_training.is_complete(out):
            if not build_missing:
                raise ParamsError(f"{field}: derived model {spec} is not built yet; run notebook 00_models")
            build(run, spec)
        specs[field] = str(lm_training.model_dir(out))
    return dataclasses.replace(run, **specs) if specs else run


def domain_report(raw: RunConfig, built: RunConfig, field: str) -> dict | None:
    """Held-out CE of a fine-tuned model and its base on the fine-tune's own text and on the
    crosscoder's text, with their ratios (None unless `field` names a fine-tune on another text)."""
    spec = getattr(raw, field)
    parsed = parse(spec)
    if not parsed or parsed[0] != "finetune":
        return None
    domain = train_corpus(raw, "finetune")
    out = {"model": spec, "fine-tune text": domain.source, "crosscoder text": raw.corpus.source}
    for name, text in (("own", domain), ("crosscoder", raw.corpus)):
        base = model_report(built, parsed[1], text=text)["held-out loss"]
        tuned = model_report(built, getattr(built, field), text=text)["held-out loss"]
        out.update({f"base CE ({name} text)": base, f"fine-tuned CE ({name} text)": tuned,
                    f"ratio ({name} text)": round(tuned / base, 4)})
    return out


def training_log(run: RunConfig, spec: str) -> list[dict]:
    """The log rows of a built derived model (empty when it has none)."""
    path = directory(run, spec) / "log.json"
    try:
        return io.read_json(path)
    except io.ArtifactError:
        return []
