"""Read a trained crosscoder: the paper's metrics, baselines, and the per-layer figures.

Everything lands in results/<pair>/<layer>/metrics.json (deterministic JSON, 6 significant
digits), results/<pair>/<layer>/strengths.{safetensors,csv}, and figures/<pair>/<layer>/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import io
from ..analysis import figures, metrics, splice
from ..crosscoders import convergence
from ..crosscoders import crosscoder as cc_mod
from ..crosscoders import evaluate
from ..crosscoders import train as train_mod
from ..harvest import activations
from ..harvest.store import PairedActivations
from ..models import loading as models
from . import pipeline
from .params import RunConfig

STRENGTHS_FILE = "strengths.safetensors"
SCALING_FILE = "latent_scaling.safetensors"
TRUE_EXCLUSIVE_RATIO = 0.2
STRENGTHS_CSV = "strengths.csv"
BASELINE_TOKENS = 20_000


def decoders(model: cc_mod.Crosscoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder matrices in float64 on the CPU."""
    return model.W_dec_A.detach().double().cpu(), model.W_dec_B.detach().double().cpu()


def raw_eval_rows(data: PairedActivations, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out activations of both models (a per-model constant scale changes neither CKA nor SVCCA)."""
    idx = data.eval_indices(max_tokens)
    return data.get(idx)


def analyse_layer(run: RunConfig, label: str, data: PairedActivations | None = None,
                  aligned_fraction: float | None = None) -> dict:
    """Compute every metric of one layer, write metrics.json, strengths and figures; return the metrics."""
    data = data or pipeline.open_pair(run, label)
    out = pipeline.layer_dir(run, label)
    pt = pipeline.point(run, label)
    device = models.pick_device(run.device)
    model = cc_mod.load(out, map_location=device)
    ev = evaluate.evaluate(model, data, run.analysis.eval_tokens, device=device)
    W_A, W_B = decoders(model)
    mean_act = ev["mean_act"].double()
    live = ev["fire_rate"].double() >= max(run.analysis.min_fire_rate, 1e-12)
    n_rel = metrics.relative_norms(W_A, W_B)
    align = metrics.alignment(W_A, W_B, live_mask_H=live)
    align_all = metrics.alignment(W_A, W_B)
    align_any = metrics.alignment(W_A, W_B, live_mask_H=mean_act > 0)
    a = run.analysis
    classes = metrics.latent_classes(n_rel, mean_act, a_only=a.a_only, b_only=a.b_only,
                                     shared=(a.shared_low, a.shared_high))
    x_a, x_b = raw_eval_rows(data, BASELINE_TOKENS)
    log = io.read_json(out / train_mod.LOG_FILE)
    conv = io.read_json(out / train_mod.CURVE_FILE)
    result = {
        "pair": run.name, "layer": pt.label, "point": pt.name, "seed": pt.seed, "relationship": run.relationship, "model_a": pipeline.display_name(run.model_a),
        "model_b": pipeline.display_name(run.model_b),
        "block_a": data.layer_a, "block_b": data.layer_b, "d_a": data.d_a, "d_b": data.d_b,
        "architecture": model.cfg.architecture, "dict_size": model.cfg.dict_size,
        "sharedness": metrics.sharedness(W_A, W_B, mean_act),
        "sharedness_null_permutation": metrics.permutation_null_sharedness(W_A, W_B, mean_act, n_perm=3)["mean"],
        "alignment": align.score, "alignment_all_latents": align_all.score,
        "alignment_any_fire": align_any.score, "min_fire_rate": run.analysis.min_fire_rate,
        "n_live": align.n_live,
        "alignment_null_permutation": metrics.permutation_null_alignment(W_A, W_B, n_perm=3, live_mask_H=live)["mean"],
        "alignment_null_gaussian": metrics.alignment_null_gaussian(int(live.sum()), data.d_a, data.d_b)
        if int(live.sum()) - 1 >= data.d_a + data.d_b else None, "explained_variance": ev["explained_variance"], "l0": ev["l0"],
        "dead_fraction": ev["dead_fraction"], "tokens_trained": log[-1]["tokens"],
        "tokens": conv["tokens"], "token_ceiling": conv["token_ceiling"], "converged": conv["converged"],
        "ev_window_gain": convergence.gain_at_stop(conv),
        "target_l0": conv["stopping_rule"]["target_l0"], "final_l1_coeff": conv["final_l1_coeff"],
        "eval_tokens": ev["eval_tokens"], "latent_classes": classes,
        "cka": metrics.linear_cka(x_a.double(), x_b.double()),
        "svcca": metrics.svcca(x_a.double(), x_b.double()),
        "aligned_fraction": 1.0 if aligned_fraction is None else aligned_fraction,
        "paper_mean_n_rel": float(n_rel[live].mean()) if live.any() else None,
        "precision": pipeline.precision_record(run, pt, data),
    }
    if data.d_a == data.d_b:
        cos = metrics.shared_cosines(W_A[live], W_B[live], a.shared_low, a.shared_high)
        result["shared_cosine_mean"] = float(cos.mean()) if len(cos) else None
    else:
        cos = None
    scaling = latent_scaling(model, data, n_rel, live, run, device)
    io.save_tensors(out / SCALING_FILE, {k: v for k, v in scaling.pop("per_latent").items()})
    result["latent_scaling"] = scaling
    result["splice"] = splice_report(run, model, data) if run.analysis.splice_seqs and not pt.repeat else None
    io.write_json(out / pipeline.METRICS_FILE, result, digits=6)
    save_strengths(out, W_A, W_B, mean_act, align.score, ev["fire_rate"])
    layer_figures(run, label, n_rel[live], cos, align.spectrum)
    figures.save_figure(convergence_figure(run, label, conv), pipeline.figure_dir(run, label) / "convergence")
    return result


CURVE_KEYS = ("ev_a", "ev_b", "l0", "dead_fraction")


def convergence_figure(run: RunConfig, label: str, conv: dict | None = None):
    """Held-out explained variance of both models, L0 and dead share against tokens, with the verdict."""
    conv = conv or io.read_json(pipeline.layer_dir(run, label) / train_mod.CURVE_FILE)
    verdict, why = convergence_parts(conv)
    fig = figures.training_curves(conv["curve"], list(CURVE_KEYS), step_key="tokens",
                                  title=f"{run.name} · {label}: {verdict}<br><span style='font-size:12px'>{why}</span>")
    return fig.update_layout(margin_t=95)


def convergence_line(conv: dict) -> str:
    """One line: converged or not, on how many tokens of the ceiling, and why it stopped."""
    verdict, why = convergence_parts(conv)
    return f"{verdict} ({why})"


def convergence_parts(conv: dict) -> tuple[str, str]:
    """The verdict (converged or not, on how many tokens of the ceiling) and why it stopped."""
    rules, gain = conv["stopping_rule"], convergence.gain_at_stop(conv)
    changed = "" if gain is None else f"EV changed by {gain:+.4f} over the last {rules['converge_window']:.0%}"
    why = changed if conv["converged"] else "; ".join(
        ["stopped by the token ceiling"] + ([f"{changed} before its decay, where the rule asks for under "
                                             f"{rules['converge_gain']:g}"] if changed else []))
    verdict = "converged" if conv["converged"] else "not converged"
    return f"{verdict} at {conv['tokens'] / 1e6:.2f}M of {conv['token_ceiling'] / 1e6:.2f}M tokens", why


def save_strengths(out: Path, W_A: torch.Tensor, W_B: torch.Tensor, mean_act: torch.Tensor, sim: float,
                   fire_rate: torch.Tensor) -> None:
    """The original's feature_strengths output: data strength, model strength, similarity (+ firing rate)."""
    fs = metrics.feature_strengths(W_A, W_B, mean_act)
    tensors = {"data_strength": fs["data_strength"].float(), "model_strength": fs["model_strength"].float(),
               "sim_metric": torch.tensor([float(sim)]), "fire_rate": fire_rate.float()}
    io.save_tensors(out / STRENGTHS_FILE, tensors)
    rows = ["latent,data_strength,model_strength,fire_rate"]
    for i, (d, m, r) in enumerate(zip(tensors["data_strength"].tolist(), tensors["model_strength"].tolist(),
                                      tensors["fire_rate"].tolist())):
        rows.append(f"{i},{d:.6g},{m:.6g},{r:.6g}")
    io.write_text(out / STRENGTHS_CSV, "\n".join(rows) + "\n")


def layer_figures(run: RunConfig, label: str, n_rel_live: torch.Tensor, cos: torch.Tensor | None,
                  spectrum: torch.Tensor) -> None:
    """Relative-norm histogram (always), cosine histogram (equal widths), CCA spectrum."""
    target = pipeline.figure_dir(run, label)
    title = f"{run.name} · {label}: relative decoder norms (live latents)"
    fig = figures.relative_norm_histogram(n_rel_live.numpy(), name_a=pipeline.display_name(run.model_a),
                                          name_b=pipeline.display_name(run.model_b), title=title)
    figures.save_figure(fig, target / "relative_norms")
    if cos is not None and len(cos):
        figures.save_figure(figures.cosine_histogram(cos.numpy(), title=f"{run.name} · {label}: decoder "
                                                     "cosine of shared latents"), target / "shared_cosines")
    figures.save_figure(figures.cca_spectrum(np.asarray(spectrum), title=f"{run.name} · {label}: canonical "
                                             "correlations of the decoders"), target / "cca_spectrum")


@torch.no_grad()
def latent_scaling(model: cc_mod.Crosscoder, data: PairedActivations, n_rel: torch.Tensor, live: torch.Tensor,
                   run: RunConfig, device, batch_size: int = 4096) -> dict:
    """Latent Scaling (Minder et al. 2025) of the exclusive latents on held-out rows.

    For each A-only (B-only) latent, the ratio of the scale with which its direction explains
    the OTHER model's reconstruction error to the scale in its own model: near 0 means truly
    exclusive; a large ratio means the latent only looks exclusive (the other model carries
    the direction too, as complete shrinkage or latent decoupling of the L1 crosscoder make).
    """
    a = run.analysis
    W_A, W_B = decoders(model)
    a_only = live & (n_rel > a.a_only)
    b_only = live & (n_rel < a.b_only)
    latents = torch.nonzero(a_only | b_only).flatten()
    summary = {"threshold": TRUE_EXCLUSIVE_RATIO, "a_only": _empty_class(), "b_only": _empty_class()}
    if len(latents) == 0:
        return {**summary, "per_latent": {"latents": torch.zeros(0, dtype=torch.long)}}
    acc = metrics.LatentScalingAccumulator(W_A, W_B, latents)
    idx = data.eval_indices(run.analysis.eval_tokens)
    for start in range(0, len(idx), batch_size):
        x_a, x_b = (t.to(device) for t in data.get(idx[start: start + batch_size]))
        f, xa_hat, xb_hat = model(x_a, x_b)
        acc.update(f.double().cpu(), x_a.double().cpu(), x_b.double().cpu(),
                   xa_hat.double().cpu(), xb_hat.double().cpu())
    res = acc.result()
    other = torch.where(a_only[latents], res["beta_error_B"] / res["beta_error_A"],
                        res["beta_error_A"] / res["beta_error_B"])
    for name, mask in (("a_only", a_only[latents]), ("b_only", b_only[latents])):
        ratios = other[mask]
        ratios = ratios[torch.isfinite(ratios)]
        if len(ratios):
            summary[name] = {"count": int(mask.sum()), "median_ratio": float(ratios.median()),
                             "truly_exclusive": int((ratios.abs() <= TRUE_EXCLUSIVE_RATIO).sum())}
    per_latent = {k: v.double() if v.is_floating_point() else v for k, v in res.items()}
    per_latent["other_model_ratio"] = other
    return {**summary, "per_latent": per_latent}


def _empty_class() -> dict:
    return {"count": 0, "median_ratio": None, "truly_exclusive": 0}


def sibling_points(run: RunConfig, name: str) -> list[str]:
    """Trained points of the same layer (other architectures / seeds), this one first."""
    pt = pipeline.point(run, name)
    names = [p.name for p in pipeline.points(run) if p.label == pt.label]
    done = [n for n in names if (pipeline.layer_dir(run, n) / pipeline.RUN_FILE).exists() or n == name]
    return sorted(done, key=lambda n: n != name)


def compare_points(run: RunConfig, names: list[str], data: PairedActivations) -> tuple[dict, list[dict]]:
    """Relative norms of live latents and reconstruction-vs-sparsity numbers for trained points of one layer."""
    device = models.pick_device(run.device)
    hists, rows = {}, []
    for name in names:
        model = cc_mod.load(pipeline.layer_dir(run, name), map_location=device)
        ev = evaluate.evaluate(model, data, run.analysis.eval_tokens, device=device)
        W_A, W_B = decoders(model)
        live = ev["fire_rate"] >= max(run.analysis.min_fire_rate, 1e-12)
        hists[name] = metrics.relative_norms(W_A, W_B)[live].numpy()
        rows.append({"crosscoder": name, "architecture": model.cfg.architecture, "L0": ev["l0"],
                     "EV A": ev["explained_variance"]["A"], "EV B": ev["explained_variance"]["B"],
                     "sharedness": metrics.sharedness(W_A, W_B, ev["mean_act"].double()),
                     "alignment": metrics.alignment(W_A, W_B, live_mask_H=live).score,
                     "dead": ev["dead_fraction"]})
    return hists, rows


def splice_report(run: RunConfig, model: cc_mod.Crosscoder, data: PairedActivations) -> dict:
    """Splice-in fidelity of both models on the last held-out sequences of the pair's tokens."""
    tokens = pipeline.pair_tokens(run)
    held_out = np.flatnonzero(activations.eval_sequences(len(tokens.pos_a), data.eval_fraction))
    seqs = held_out[-min(run.analysis.splice_seqs, len(held_out)):].tolist()
    device = models.pick_device(run.device)
    dtype = getattr(torch, pipeline.harvest_dtype(run))
    model_a, tok_a = models.load_model(run.model_a, device=device, dtype=dtype)
    model_b, tok_b = (model_a, tok_a) if run.model_b == run.model_a else \
        models.load_model(run.model_b, device=device, dtype=dtype)
    side_a = splice.SplicedModel(model_a, tok_a, data.layer_a)
    side_b = splice.SplicedModel(model_b, tok_b, data.layer_b)
    model.eval()
    return splice.fidelity(model, side_a, side_b, [tokens.ids_a[i].to(device) for i in seqs],
                           [tokens.ids_b[i].to(device) for i in seqs], [tokens.pos_a[i] for i in seqs],
                           [tokens.pos_b[i] for i in seqs], data.scale_a, data.scale_b, run.harvest.max_norm_ratio)
