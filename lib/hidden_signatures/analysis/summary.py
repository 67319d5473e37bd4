"""Every pair x layer found under results/, beside the paper's Figure 8, with seed spread and nulls."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import io
from . import figures

LAYER_ORDER = ("first", "middle", "last")
# Paper Figure 8: (sharedness, alignment) per relationship and layer (PAPER.md).
PAPER_FIG8 = {
    "sanity": {"first": (1.00, 1.000), "middle": (1.00, 1.000), "last": (1.00, 1.000)},
    "finetuning": {"first": (1.00, 0.999), "middle": (0.77, 0.768), "last": (0.76, 0.807)},
    "distillation": {"first": (1.00, 0.937), "middle": (0.91, 0.604), "last": (0.85, 0.715)},
    "scale": {"first": (0.96, 0.286), "middle": (0.54, 0.343), "last": (0.54, 0.353)},
}
PAPER_PAIRS = {"sanity": "GPT-2 vs GPT-2", "finetuning": "Gemma-2-2B vs IT",
               "distillation": "GPT-2 vs DistilGPT-2", "scale": "Pythia-160M vs 70M"}
HEADLINE = ("sharedness", "alignment", "cka")
COLUMNS = ["pair", "relationship", "layer", "architecture", "seeds", "sharedness", "sharedness_spread",
           "sharedness_null", "alignment", "alignment_spread", "alignment_null", "cka", "svcca", "ev_a", "ev_b", "l0",
           "dead_fraction", "tokens", "converged", "ev_window_gain", "aligned_fraction", "precision",
           "paper_sharedness", "paper_alignment"]


def load_points(results_root: Path) -> pd.DataFrame:
    """One row per results/<pair>/<point>/metrics.json (every crosscoder, seeds included)."""
    rows = []
    for path in sorted(results_root.glob("*/*/metrics.json")):
        m = io.read_json(path)
        rows.append({"pair": m["pair"], "relationship": m.get("relationship", ""), "layer": m["layer"],
                     "point": m.get("point", m["layer"]), "seed": m.get("seed", 0),
                     "architecture": m.get("architecture", "relu_l1"), "sharedness": m["sharedness"],
                     "sharedness_null": m.get("sharedness_null_permutation"),
                     "alignment": m["alignment"], "alignment_null": m.get("alignment_null_permutation"),
                     "cka": m.get("cka"), "svcca": m.get("svcca"), "ev_a": m["explained_variance"]["A"],
                     "ev_b": m["explained_variance"]["B"], "l0": m["l0"], "dead_fraction": m["dead_fraction"],
                     "tokens": m.get("tokens"), "converged": m.get("converged"),
                     "ev_window_gain": m.get("ev_window_gain"),
                     "aligned_fraction": m.get("aligned_fraction"), "precision": _precision(m.get("precision")),
                     "machine": _machine(m.get("precision"))})
    return pd.DataFrame(rows)


def _precision(record: dict | None) -> str:
    """`bfloat16`, `float32`, or `harvest X / train Y` when the two differ ('' for results of earlier versions)."""
    if not record:
        return ""
    harvest, train = record.get("harvest", ""), record.get("train", "")
    return harvest if harvest == train else f"harvest {harvest} / train {train}"


def _machine(record: dict | None) -> str:
    return "" if not record else f"{record.get('device', '')}, capability {record.get('capability', '')}"


def precision_note(results_root: Path) -> str:
    """One line: the precision(s) the results were computed in and on what hardware."""
    points = load_points(results_root)
    if points.empty:
        return ""
    used = ", ".join(sorted(p for p in set(points["precision"]) if p)) or "not recorded"
    machines = "; ".join(sorted(m for m in set(points["machine"]) if m)) or "not recorded"
    return f"Precision: {used} (device {machines})."


def collect(results_root: Path) -> pd.DataFrame:
    """One row per pair x layer x architecture: seeds averaged, their spread (std) beside each number."""
    points = load_points(results_root)
    if points.empty:
        return pd.DataFrame(columns=COLUMNS)
    out = []
    for (pair, layer, arch), group in points.groupby(["pair", "layer", "architecture"], sort=False):
        first = group.iloc[0]
        paper = PAPER_FIG8.get(first["relationship"], {}).get(layer, (None, None))
        row = {"pair": pair, "relationship": first["relationship"], "layer": layer, "architecture": arch,
               "seeds": len(group), "paper_sharedness": paper[0], "paper_alignment": paper[1]}
        for col in ("sharedness", "sharedness_null", "alignment", "alignment_null", "cka", "svcca", "ev_a", "ev_b", "l0",
                    "dead_fraction", "aligned_fraction"):
            row[col] = group[col].mean() if group[col].notna().any() else None
        row["precision"] = ", ".join(sorted(set(group["precision"])))
        row["tokens"] = group["tokens"].mean() if group["tokens"].notna().any() else None
        row["converged"] = bool(group["converged"].eq(True).all())  # every seed stopped by the rule
        row["ev_window_gain"] = group["ev_window_gain"].mean() if group["ev_window_gain"].notna().any() else None
        for col in ("sharedness", "alignment"):
            row[f"{col}_spread"] = group[col].std(ddof=1) if len(group) > 1 else None
        out.append(row)
    frame = pd.DataFrame(out, columns=COLUMNS)
    frame["_order"] = frame["layer"].map({k: i for i, k in enumerate(LAYER_ORDER)}).fillna(99)
    frame["_arch"] = frame["architecture"] != "relu_l1"
    frame = frame.sort_values(["pair", "_arch", "architecture", "_order"]).drop(columns=["_order", "_arch"])
    return frame.reset_index(drop=True)


def seed_floor(frame: pd.DataFrame) -> dict[str, float]:
    """The largest seed spread measured per metric (the noise floor two pairs must clear)."""
    return {m: float(frame[f"{m}_spread"].max()) for m in ("sharedness", "alignment")
            if frame[f"{m}_spread"].notna().any()}


def pooled_seed_spread(frame: pd.DataFrame) -> dict[str, float]:
    """The seed spread pooled over every row with several seeds (sqrt of the dof-weighted mean
    variance): the table's typical noise, steadier than one row's spread from two or three seeds."""
    out = {}
    for m in ("sharedness", "alignment"):
        rows = frame[frame[f"{m}_spread"].notna() & (frame["seeds"] > 1)]
        if not rows.empty:
            dof = rows["seeds"] - 1
            out[m] = float(((dof * rows[f"{m}_spread"] ** 2).sum() / dof.sum()) ** 0.5)
    return out


def indistinguishable(frame: pd.DataFrame, layer: str = "middle") -> list[str]:
    """Pairs of pairs whose values at `layer` differ by less than the seed floor (one line each)."""
    floor = seed_floor(frame)
    rows = frame[(frame["layer"] == layer) & (frame["architecture"] == "relu_l1")].reset_index(drop=True)
    notes = []
    for metric, spread in floor.items():
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                diff = abs(rows.loc[i, metric] - rows.loc[j, metric])
                if diff < 2 * spread:
                    notes.append(f"{metric} at {layer}: {rows.loc[i, 'pair']} vs {rows.loc[j, 'pair']} differ by "
                                 f"{diff:.3f}, less than twice the seed spread ({spread:.3f})")
    return notes


def heatmap_table(frame: pd.DataFrame, metric: str) -> dict[str, dict[str, float]]:
    """{pair (architecture): {layer: value}} for a heatmap."""
    table: dict[str, dict[str, float]] = {}
    for row in frame.itertuples(index=False):
        name = row.pair if row.architecture == "relu_l1" else f"{row.pair} ({row.architecture})"
        table.setdefault(name, {})[row.layer] = getattr(row, metric)
    return table


def write(frame: pd.DataFrame, target: Path) -> list[Path]:
    """summary.csv, summary.html and sharedness / alignment heatmaps (PNG + HTML) under `target`."""
    target.mkdir(parents=True, exist_ok=True)
    io.write_text(target / "summary.csv", frame.to_csv(index=False, float_format="%.4f"))
    io.write_text(target / "summary.html", frame.to_html(index=False, float_format=lambda v: f"{v:.4f}",
                                                         na_rep=""))
    io.write_text(target / "summary.md", markdown_table(frame) + "\n")
    written = [target / "summary.csv", target / "summary.html", target / "summary.md"]
    for metric in ("sharedness", "alignment"):
        fig = figures.summary_heatmap(heatmap_table(frame, metric), title=f"{metric} by pair and layer")
        written += figures.save_figure(fig, target / f"heatmap_{metric}")
    return written


def _pm(value, spread) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{value:.3f}" + ("" if spread is None or pd.isna(spread) else f" ± {spread:.3f}")


def _null(value) -> str:
    return "" if value is None or pd.isna(value) else f" ({value:.3f})"


def markdown_table(frame: pd.DataFrame) -> str:
    """The summary as Markdown for the README: ours (± seed spread, null) beside the paper's."""
    head = ("| pair | crosscoder | layer | sharedness (null) | alignment (null) | CKA | EV A / B | L0 | dead | "
            "tokens | paper (sharedness / alignment) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in frame.itertuples(index=False):
        paper = "" if r.paper_sharedness is None or pd.isna(r.paper_sharedness) else \
            f"{r.paper_sharedness:.2f} / {r.paper_alignment:.3f}"
        lines.append(f"| {r.pair} | {r.architecture} | {r.layer} | "
                     f"{_pm(r.sharedness, r.sharedness_spread)}{_null(r.sharedness_null)} | "
                     f"{_pm(r.alignment, r.alignment_spread)}{_null(r.alignment_null)} | {_pm(r.cka, None)} | "
                     f"{r.ev_a:.2f} / {r.ev_b:.2f} | {r.l0:.0f} | {r.dead_fraction:.2f} | "
                     f"{_tokens(r.tokens, r.converged, r.ev_window_gain)} | {paper} |")
    if not frame.empty and not frame["converged"].all():
        lines.append("")
        lines.append(f"{NOT_CONVERGED} did not converge: the token ceiling, not the stopping rule, ended its training; "
                     "the number after it is how much held-out explained variance (mean of A and B) still changed "
                     "over the rule's window before the ceiling's lr decay (in the default pairs: the last 20% of "
                     "the tokens, where the rule asks for under 0.005; curves in 04_analysis).")
    return "\n".join(lines)


NOT_CONVERGED = "†"


def _tokens(tokens, converged, gain=None) -> str:
    """Tokens trained, e.g. `0.64M`, marked when the run did not converge, with its EV change then
    (`0.40M † +0.021`)."""
    if tokens is None or pd.isna(tokens):
        return ""
    if converged:
        return f"{tokens / 1e6:.2f}M"
    return f"{tokens / 1e6:.2f}M {NOT_CONVERGED}" + ("" if gain is None or pd.isna(gain) else f" {gain:+.3f}")


def compare_pairs(frame: pd.DataFrame, pair_a: str, pair_b: str, metrics: tuple[str, ...] = HEADLINE) -> pd.DataFrame:
    """Two pairs layer by layer (ReLU+L1 crosscoders): each value, their difference, and whether it
    clears twice the seed floor. The floor is the larger of the two pairs' own seed spreads at that
    layer where they trained several seeds, raised to the table's pooled spread if that is larger (a
    spread from two seeds has one degree of freedom and can come out near zero by chance), else the
    largest spread of the whole table (`floor from` says which)."""
    overall, pooled = seed_floor(frame), pooled_seed_spread(frame)
    rows = frame[frame["architecture"] == "relu_l1"].set_index(["pair", "layer"])
    out = []
    for layer in LAYER_ORDER:
        if (pair_a, layer) not in rows.index or (pair_b, layer) not in rows.index:
            continue
        a, b = rows.loc[(pair_a, layer)], rows.loc[(pair_b, layer)]
        for metric in metrics:
            own = [s for s in (a.get(f"{metric}_spread"), b.get(f"{metric}_spread")) if s is not None and pd.notna(s)]
            floor, source = (max(own), "these pairs' seeds") if own else (overall.get(metric), "whole table")
            if own and pooled.get(metric, 0.0) > floor:
                floor, source = pooled[metric], "whole table, pooled"
            source = source if floor is not None else "none (no seed spread of this metric)"
            diff = b[metric] - a[metric]
            verdict = "no seed floor" if floor is None else (
                "differ" if abs(diff) > 2 * floor else "within seed noise")
            out.append({"layer": layer, "metric": metric, pair_a: a[metric], pair_b: b[metric],
                        "difference (b - a)": diff, "seed floor": floor, "floor from": source, "verdict": verdict})
    return pd.DataFrame(out)
