"""Plotly figures for the notebooks: builders that take plain tensors / arrays / lists and return a `go.Figure`.

Builders never touch disk; `save_figure` (figure_export.py, re-exported here) is the only writer.
Histograms are binned here with numpy (exact edges, the right edge included) and drawn as bars,
so a figure holds `bins` numbers, not every latent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figure_export import FORMATS, find_chromium, save_figure  # noqa: F401  (figures.X, as before)

TEMPLATE = "plotly_white"
FONT = {"family": "DejaVu Sans, Liberation Sans, Arial, sans-serif", "size": 13, "color": "#222222"}
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")
# (label template, low, high) on the relative-norm axis; "shared" follows PAPER.md (0.3 < n_rel < 0.7).
MODE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("{b} only", 0.0, 0.1), ("shared", 0.3, 0.7), ("{a} only", 0.9, 1.0))
BAND_COLORS = ("#d62728", "#7f7f7f", "#1f77b4")


# ----------------------------------------------------------------------------- helpers

def _as_1d(values: Any, name: str) -> np.ndarray:
    """Any tensor / array / list as a flat float64 numpy array (tensors detached to CPU)."""
    if hasattr(values, "detach"):
        values = values.detach().to("cpu").double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    return arr


def _finite(arr: np.ndarray) -> np.ndarray:
    """Drop NaN/inf entries (dead latents give 0/0 relative norms)."""
    return arr[np.isfinite(arr)]


def _check_bins(bins: int) -> None:
    """Reject a bin count that is not a positive integer."""
    if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")


def _style(fig: go.Figure, title: str, xlabel: str | None = None, ylabel: str | None = None) -> go.Figure:
    """Apply the shared layout: template, fixed fonts, title, axis labels, fixed margins."""
    fig.update_layout(template=TEMPLATE, font=FONT, title={"text": title, "x": 0.5, "xanchor": "center"},
                      margin={"l": 70, "r": 30, "t": 70, "b": 60}, bargap=0,
                      legend={"bgcolor": "rgba(255,255,255,0.7)"})
    if xlabel is not None:
        fig.update_xaxes(title_text=xlabel)
    if ylabel is not None:
        fig.update_yaxes(title_text=ylabel)
    return fig


def _hist_bar(values: np.ndarray, bins: int, lo: float, hi: float, color: str, name: str) -> go.Bar:
    """Bin `values` on [lo, hi] into `bins` equal bins (numpy, right edge included) as a bar trace."""
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    return go.Bar(x=centers, y=counts, width=(hi - lo) / bins, marker={"color": color, "line": {"width": 0}},
                  name=name, showlegend=False,
                  customdata=np.stack([edges[:-1], edges[1:]], axis=1),
                  hovertemplate="[%{customdata[0]:.3f}, %{customdata[1]:.3f}]: %{y}<extra></extra>")


def _rel_norm_label(name_a: str, name_b: str) -> str:
    """Axis label of the relative decoder norm naming both models."""
    return f"relative decoder norm ‖A‖ / (‖A‖ + ‖B‖)   (A = {name_a}, B = {name_b})"


def _mark_modes(fig: go.Figure, name_a: str, name_b: str, row: int | None = None, col: int | None = None) -> None:
    """Shade the three modes of the relative-norm histogram (B-only, shared, A-only) and label them."""
    for (label, lo, hi), color in zip(MODE_BANDS, BAND_COLORS):
        fig.add_vrect(x0=lo, x1=hi, fillcolor=color, opacity=0.08, line_width=0, layer="below",
                      annotation_text=label.format(a=name_a, b=name_b), annotation_position="top",
                      annotation_font={"size": 11, "color": color}, row=row, col=col)


# ----------------------------------------------------------------------------- builders

def relative_norm_histogram(n_rel: Any, *, name_a: str = "A", name_b: str = "B", bins: int = 200,
                            title: str = "Relative decoder norms", mark_modes: bool = True,
                            log_y: bool = False) -> go.Figure:
    """Histogram of n_rel on [0, 1]; the tri-modal shape (B-only, shared, A-only) is the paper's key plot."""
    _check_bins(bins)
    values = _finite(_as_1d(n_rel, "n_rel"))
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(f"n_rel must lie in [0, 1], got range [{values.min():.4g}, {values.max():.4g}]")
    fig = go.Figure(_hist_bar(values, bins, 0.0, 1.0, COLORS[0], "latents"))
    if mark_modes:
        _mark_modes(fig, name_a, name_b)
    fig.update_xaxes(range=[0, 1])
    if log_y:
        fig.update_yaxes(type="log")
    return _style(fig, title, _rel_norm_label(name_a, name_b), "latents")


def relative_norm_histograms(n_rel_by_label: Mapping[str, Any], *, name_a: str = "A", name_b: str = "B",
                             bins: int = 200, title: str = "Relative decoder norms", cols: int | None = None,
                             mark_modes: bool = True) -> go.Figure:
    """Small multiples of relative-norm histograms, one panel per label (architectures, students)."""
    _check_bins(bins)
    if not n_rel_by_label:
        raise ValueError("n_rel_by_label is empty: give at least one label -> n_rel")
    labels = list(n_rel_by_label)
    ncols = cols or min(len(labels), 4)
    if ncols < 1:
        raise ValueError(f"cols must be a positive integer, got {cols!r}")
    nrows = -(-len(labels) // ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=labels, horizontal_spacing=0.06,
                        vertical_spacing=0.15)
    for i, label in enumerate(labels):
        row, col = i // ncols + 1, i % ncols + 1
        values = _finite(_as_1d(n_rel_by_label[label], f"n_rel[{label!r}]"))
        fig.add_trace(_hist_bar(values, bins, 0.0, 1.0, COLORS[i % len(COLORS)], label), row=row, col=col)
        if mark_modes:
            _mark_modes(fig, name_a, name_b, row=row, col=col)
        fig.update_xaxes(range=[0, 1], row=row, col=col)
    _style(fig, title)
    fig.update_xaxes(title_text=f"n_rel (0: {name_b} only, 1: {name_a} only)", row=nrows)
    fig.update_yaxes(title_text="latents", col=1)
    return fig


def cosine_histogram(cosines: Any, *, bins: int = 100, title: str = "Decoder cosine similarity of shared latents"
                     ) -> go.Figure:
    """Histogram of cosine similarities on [-1, 1] (only meaningful when dA = dB)."""
    _check_bins(bins)
    values = _finite(_as_1d(cosines, "cosines"))
    if values.size and (values.min() < -1 - 1e-6 or values.max() > 1 + 1e-6):
        raise ValueError(f"cosines must lie in [-1, 1], got range [{values.min():.4g}, {values.max():.4g}]")
    fig = go.Figure(_hist_bar(np.clip(values, -1, 1), bins, -1.0, 1.0, COLORS[2], "latents"))
    fig.update_xaxes(range=[-1, 1])
    return _style(fig, title, "cosine(W_dec_A[i], W_dec_B[i])", "latents")


def cca_spectrum(correlations: Any, *, title: str = "Canonical correlations of the decoders") -> go.Figure:
    """Canonical correlations sorted high to low (one line, or one per label if a mapping is given)."""
    series = correlations if isinstance(correlations, Mapping) else {"canonical correlation": correlations}
    fig = go.Figure()
    for i, (label, values) in enumerate(series.items()):
        rho = np.sort(_finite(_as_1d(values, f"correlations[{label!r}]")))[::-1]
        fig.add_trace(go.Scatter(x=np.arange(1, rho.size + 1), y=rho, mode="lines", name=str(label),
                                 line={"color": COLORS[i % len(COLORS)], "width": 2}))
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(showlegend=len(series) > 1)
    return _style(fig, title, "component (sorted)", "canonical correlation")


def training_curves(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], *, step_key: str = "step",
                    title: str = "Training", log_y: Sequence[str] = ()) -> go.Figure:
    """One panel per logged key against the step, from a list of log rows (dicts)."""
    if not keys:
        raise ValueError("keys is empty: name at least one logged quantity to plot")
    fig = make_subplots(rows=len(keys), cols=1, shared_xaxes=True, subplot_titles=list(keys),
                        vertical_spacing=min(0.08, 0.3 / len(keys)))
    for i, key in enumerate(keys):
        pts = [(r[step_key], r[key]) for r in rows if key in r and step_key in r and r[key] is not None]
        if rows and not pts:
            raise ValueError(f"key {key!r} is in no log row; available: {sorted({k for r in rows for k in r})}")
        x, y = (list(t) for t in zip(*pts)) if pts else ([], [])
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=key, showlegend=False,
                                 line={"color": COLORS[i % len(COLORS)], "width": 1.5}), row=i + 1, col=1)
        if key in log_y:
            fig.update_yaxes(type="log", row=i + 1, col=1)
    _style(fig, title)
    fig.update_xaxes(title_text=step_key, row=len(keys), col=1)
    return fig


def learning_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str], *,
                    x_key: str = "tokens", title: str = "Learning curves",
                    reference: Mapping[str, float] | None = None, reference_name: str = "reference") -> go.Figure:
    """One panel per key, one line per named run (e.g. two students), a dotted reference level per key."""
    if not keys:
        raise ValueError("keys is empty: name at least one logged quantity to plot")
    fig = make_subplots(rows=len(keys), cols=1, shared_xaxes=True, subplot_titles=list(keys),
                        vertical_spacing=min(0.1, 0.3 / len(keys)))
    for i, key in enumerate(keys):
        for j, (name, rows) in enumerate(curves.items()):
            pts = [(r[x_key], r[key]) for r in rows if r.get(key) is not None and x_key in r]
            x, y = (list(t) for t in zip(*pts)) if pts else ([], [])
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, legendgroup=name,
                                     showlegend=i == 0, line={"color": COLORS[j % len(COLORS)], "width": 1.5}),
                          row=i + 1, col=1)
        if reference and key in reference:
            fig.add_hline(y=reference[key], line={"dash": "dot", "color": "gray"}, row=i + 1, col=1,
                          annotation_text=reference_name, annotation_position="top left")
    _style(fig, title)
    fig.update_xaxes(title_text=x_key, row=len(keys), col=1)
    return fig


def strength_scatter(data_strength: Any, model_strength: Any, labels: Sequence[str] | None = None, *,
                     name_a: str = "A", name_b: str = "B",
                     title: str = "Latent strengths: data vs model") -> go.Figure:
    """Per-latent data strength (mean activation, log x) against model strength (n_rel)."""
    x, y = _as_1d(data_strength, "data_strength"), _as_1d(model_strength, "model_strength")
    if x.shape != y.shape or (labels is not None and len(labels) != x.size):
        raise ValueError(f"lengths differ: data_strength {x.size}, model_strength {y.size}, "
                         f"labels {None if labels is None else len(labels)}")
    keep = (x > 0) & np.isfinite(x) & np.isfinite(y)
    text = [str(labels[i]) for i in np.flatnonzero(keep)] if labels is not None else None
    fig = go.Figure(go.Scatter(x=x[keep], y=y[keep], mode="markers", text=text, name="latents",
                               marker={"size": 4, "color": COLORS[0], "opacity": 0.5}))
    fig.update_xaxes(type="log")
    dropped = int((~keep).sum())
    if dropped:  # dead latents have data strength 0 and cannot sit on a log axis; say so on the plot
        fig.add_annotation(text=f"{dropped} latents with data strength ≤ 0 not shown", xref="paper", yref="paper",
                           x=1, y=1.02, showarrow=False, xanchor="right", font={"size": 11})
    return _style(fig, title, "data strength (mean activation)", f"model strength n_rel (1: {name_a}, 0: {name_b})")


def summary_heatmap(table: Mapping[str, Mapping[str, float]], *, title: str = "Summary", zmin: float = 0.0,
                    zmax: float = 1.0, digits: int = 2, colorbar_title: str = "",
                    xlabel: str = "layer", ylabel: str = "") -> go.Figure:
    """Heatmap of rows (pairs) x columns (layers) with the value printed in each cell; missing cells blank."""
    if not table:
        raise ValueError("table is empty: give {row: {column: value}}")
    rows = list(table)
    cols = list(dict.fromkeys(c for r in rows for c in table[r]))
    z = np.array([[float(table[r].get(c, np.nan)) for c in cols] for r in rows], dtype=np.float64)
    text = [["" if np.isnan(v) else f"{v:.{digits}f}" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=rows, text=text, texttemplate="%{text}", zmin=zmin, zmax=zmax,
                               colorscale="Viridis", colorbar={"title": {"text": colorbar_title}},
                               hovertemplate="%{y} / %{x}: %{z}<extra></extra>"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return _style(fig, title, xlabel, ylabel)


def calibration_curve(truth: Any, measured: Mapping[str, Any], *, title: str = "Calibration",
                      xlabel: str = "true value", ylabel: str = "measured value") -> go.Figure:
    """Measured against true values, one line per estimator, beside the identity line."""
    x = _as_1d(truth, "truth")
    if not measured:
        raise ValueError("measured is empty: give {name: values}")
    fig = go.Figure()
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    for i, (name, values) in enumerate(measured.items()):
        y = _as_1d(values, f"measured[{name!r}]")
        if y.shape != x.shape:
            raise ValueError(f"measured[{name!r}] has {y.size} values, truth has {x.size}")
        lo, hi = min(lo, float(np.nanmin(y))), max(hi, float(np.nanmax(y)))
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=str(name),
                                 line={"color": COLORS[i % len(COLORS)]}))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="identity",
                             line={"color": "#555555", "dash": "dash", "width": 1}))
    return _style(fig, title, xlabel, ylabel)


def latent_scaling_scatter(x: Any, y: Any, labels: Sequence[str] | None = None, *,
                           title: str = "Latent scaling", xlabel: str = "x", ylabel: str = "y",
                           log_x: bool = False, log_y: bool = False) -> go.Figure:
    """Per-latent scatter of two scaling quantities with optional hover labels."""
    xs, ys = _as_1d(x, "x"), _as_1d(y, "y")
    if xs.shape != ys.shape or (labels is not None and len(labels) != xs.size):
        raise ValueError(f"lengths differ: x {xs.size}, y {ys.size}, labels {None if labels is None else len(labels)}")
    text = [str(label) for label in labels] if labels is not None else None
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="markers", text=text, name="latents",
                               marker={"size": 5, "color": COLORS[3], "opacity": 0.6}))
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log")
    return _style(fig, title, xlabel, ylabel)
