"""Benchmark family "harvest": our nnsight harvest against the original's forward pass and a plain-forward bound."""

from __future__ import annotations


import torch

from benchmarks.config import BenchConfig
from benchmarks.timing import Precision, ratio_entry, time_interleaved
from hidden_signatures import precision
from hidden_signatures.harvest import activations
from hidden_signatures.models import loading as models


class _StopForward(Exception):
    """Raised by a forward pre-hook to end a plain transformers forward at a block."""


def random_ids(n_seqs: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Seeded random token ids [S, L] (the work of a forward pass does not depend on the text)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_seqs, seq_len), generator=gen)


def harvest_ours(traced: activations.Traced, ids_SL: torch.Tensor, layer: int) -> torch.Tensor:
    """Our way: the store harvest's nnsight trace (model in harvest's dtype), saving blocks[layer].input, then stop."""
    return activations._forward(traced, ids_SL, [layer])[layer]


def harvest_original(model_fp32, ids_SL: torch.Tensor, layer: int) -> torch.Tensor:
    """The original's way: a full fp32 forward keeping every hidden state (run_with_cache-like)."""
    with torch.no_grad():
        out = model_fp32(ids_SL, output_hidden_states=True)
    return out.hidden_states[layer]


def harvest_limit(model, ids_SL: torch.Tensor, layer: int) -> torch.Tensor:
    """The practical limit: a plain forward of the same model (same precision), stopped by a hook at the block."""
    caught: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        caught["x"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handle = models.block_list(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids_SL)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return caught["x"]


HARVEST_LIMIT_TARGET = {"bfloat16": 0.95, "float32": 0.9}
"""Harvest vs a plain forward stopped at the block, in the precision auto picks: on an AMX CPU
(bf16) the nnsight trace must cost at most 5%; on an AVX2-only CPU (fp32) at most 10%."""


def bench_harvest(cfg: BenchConfig, prec: Precision) -> tuple[list[dict], dict]:
    """Harvest one batch at the layer, model in harvest's dtype auto: ours vs the original's fp32 full
    forward, and vs the limit (a plain forward of the same model, so the same precision)."""
    traced = activations._local_model(cfg.model, "cpu", precision.resolve("auto", "cpu"), remote=False)
    model = traced.nn_model._module
    model_fp32 = model if prec.chosen == "float32" else models.load_model(cfg.model, dtype=torch.float32)[0]
    layer = models.resolve_layer(cfg.layer, models.num_blocks(model))
    ids_SL = random_ids(cfg.harvest_seqs, cfg.seq_len, model.get_input_embeddings().num_embeddings, cfg.seed)
    fns = {"ours": lambda: harvest_ours(traced, ids_SL, layer),
           "original": lambda: harvest_original(model_fp32, ids_SL, layer),
           "limit": lambda: harvest_limit(model, ids_SL, layer)}
    times = time_interleaved(fns, max(cfg.repeats, cfg.harvest_repeats))
    ours_x, limit_x = fns["ours"](), fns["limit"]()
    checks = {"harvest_layer": layer, "harvest_tokens": int(ids_SL.numel()),
              "harvest_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "harvest_ours_equals_limit": bool(torch.equal(ours_x, limit_x))}
    tag = f"{cfg.harvest_seqs}x{cfg.seq_len} tokens, block {layer}"
    return [ratio_entry(f"harvest ({tag}): ours ({prec.short}, dtype auto) vs original (fp32, all hidden states)",
                        times["ours"], times["original"], 3.0),
            ratio_entry(f"harvest ({tag}): ours ({prec.short}) vs limit (plain {prec.short} forward stopped "
                        "at the block)", times["ours"], times["limit"], HARVEST_LIMIT_TARGET[prec.chosen])], checks
