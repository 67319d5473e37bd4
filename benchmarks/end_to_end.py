"""Benchmark family "end to end": harvest and train as the original did, against ours, on the same tokens."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmarks.config import L1_COEFF, BenchConfig
from benchmarks.harvest import harvest_original, random_ids
from benchmarks.timing import Precision, ratio_entry, timed
from hidden_signatures.harvest import activations
from hidden_signatures.models import loading as models
from hidden_signatures.crosscoders import crosscoder as cc_mod
from hidden_signatures.crosscoders import train as train_mod
from hidden_signatures.crosscoders.train_config import TrainConfig


def original_harvest(spec: str, ids_SL: torch.Tensor, layer: int, batch_size: int) -> torch.Tensor:
    """The original's harvest: fp32 model, full forwards keeping every hidden state, rows kept in RAM."""
    model, _ = models.load_model(spec, dtype=torch.float32)
    rows = [harvest_original(model, ids_SL[i: i + batch_size], layer)[:, 1:].reshape(-1, models.hidden_size(model))
            for i in range(0, ids_SL.shape[0], batch_size)]
    x_ND = torch.cat(rows)
    return x_ND * (math.sqrt(x_ND.shape[1]) / x_ND.norm(dim=1).mean())


def original_train(x_ND: torch.Tensor, dict_size: int, steps: int, batch_size: int, seed: int) -> float:
    """The original's training: fp32 crosscoder (same loss), Adam, random batches from RAM; last loss."""
    model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=x_ND.shape[1], d_b=x_ND.shape[1], dict_size=dict_size), seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = x_ND[torch.randint(0, x_ND.shape[0], (batch_size,), generator=gen)]
        total = model.loss(x, x, L1_COEFF).total
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return total.item()


def ours_config(steps: int, batch_size: int, seed: int) -> TrainConfig:
    """Our trainer's settings for the end-to-end run (the defaults, dtype auto)."""
    return TrainConfig(tokens=steps * batch_size, batch_size=batch_size, seed=seed, dtype="auto")


def ours_train(store: activations.ActivationStore, layer: int, dict_size: int, steps: int, batch_size: int,
               seed: int, out_dir: Path) -> list[dict]:
    """Our training: train.train on the memmapped store paired with itself (dtype auto)."""
    data = activations.PairedActivations(store, store, layer, layer)
    model = cc_mod.build(cc_mod.CrosscoderConfig(d_a=data.d_a, d_b=data.d_b, dict_size=dict_size), seed)
    return train_mod.train(model, data, ours_config(steps, batch_size, seed), L1_COEFF, out_dir, desc="bench train")


def bench_end_to_end(cfg: BenchConfig, prec: Precision, work: Path) -> tuple[list[dict], dict]:
    """One pair (the model with itself), one layer: harvest + training, ours vs the original's way."""
    n_blocks, _ = models.model_shape(cfg.model)
    layer = models.resolve_layer(cfg.layer, n_blocks)
    warm, _ = models.load_model(cfg.model, dtype=torch.float32)  # warm the page cache for both sides alike
    d_model = models.hidden_size(warm)
    del warm
    # the sparse step's crossover is measured once per machine and shape and cached: warmed here
    # like the page cache, its one-off cost recorded beside the rows (0 when it was cached already)
    t_probe, _ = timed(lambda: train_mod.resolve_sparse_below(ours_config(cfg.e2e_steps, cfg.e2e_batch, cfg.seed),
                                                              d_model, d_model, cfg.e2e_dict, "cpu"))
    vocab = models.read_config(cfg.model).get_text_config().vocab_size
    ids_SL = random_ids(max(2, math.ceil(cfg.e2e_tokens / (cfg.seq_len - 1))), cfg.seq_len, vocab, cfg.seed + 1)
    t_ours_h, store = timed(lambda: activations.harvest(cfg.model, ids_SL, [layer], batch_size=cfg.harvest_seqs,
                                                        dtype="auto", root=work / "stores", desc="bench"))
    t_orig_h, x_ND = timed(lambda: original_harvest(cfg.model, ids_SL, layer, cfg.harvest_seqs))
    t_ours_t, _ = timed(lambda: ours_train(store, layer, cfg.e2e_dict, cfg.e2e_steps, cfg.e2e_batch,
                                           cfg.seed, work / "ours_crosscoder"))
    t_orig_t, _ = timed(lambda: original_train(x_ND, cfg.e2e_dict, cfg.e2e_steps, cfg.e2e_batch, cfg.seed))
    tag = f"{store.n_tokens} tokens, {cfg.e2e_steps} steps x {cfg.e2e_batch}, H {cfg.e2e_dict}"
    entries = [ratio_entry(f"end to end ({tag}): ours ({prec.short}) vs original (fp32)",
                           t_ours_h + t_ours_t, t_orig_h + t_orig_t, 3.0),
               ratio_entry("end to end: harvest part", t_ours_h, t_orig_h, 3.0),
               ratio_entry("end to end: training part", t_ours_t, t_orig_t, 2.0)]
    return entries, {"e2e_tokens": store.n_tokens, "e2e_layer": layer, "e2e_sparse_probe_s": round(t_probe, 2)}
