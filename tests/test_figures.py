"""Tests for hidden_signatures.analysis.figures: builder contents, byte-reproducible export, atomic writes."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from conftest import needs_chromium
import torch

from hidden_signatures.analysis import figure_export as FX

from hidden_signatures.analysis import figures as F

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




def _n_rel(seed: int = 0) -> torch.Tensor:
    """A tri-modal set of relative norms (B-only, shared, A-only), with one dead latent (NaN)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.rand(30, generator=g) * 0.1, 0.4 + torch.rand(50, generator=g) * 0.2,
             0.9 + torch.rand(20, generator=g) * 0.1, torch.tensor([float("nan")])]
    return torch.cat(parts)


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which must come first."""
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- builders

def test_relative_norm_histogram_bins_modes_labels() -> None:
    fig = F.relative_norm_histogram(_n_rel(), name_a="SmolLM2", name_b="Gemma3", bins=200, title="layer 15")
    (bar,) = fig.data
    assert len(bar.x) == 200 and bar.width == pytest.approx(1 / 200)
    assert sum(bar.y) == 100  # the NaN (dead latent) is dropped, every other latent counted once
    assert bar.x[0] == pytest.approx(0.0025) and bar.x[-1] == pytest.approx(0.9975)
    assert fig.layout.title.text == "layer 15"
    assert "SmolLM2" in fig.layout.xaxis.title.text and "Gemma3" in fig.layout.xaxis.title.text
    assert fig.layout.yaxis.title.text == "latents"
    assert len(fig.layout.shapes) == 3
    labels = [a.text for a in fig.layout.annotations]
    assert labels == ["Gemma3 only", "shared", "SmolLM2 only"]
    assert fig.layout.template.layout.paper_bgcolor == "white"  # plotly_white
    assert len(F.relative_norm_histogram(_n_rel(), mark_modes=False).layout.shapes) == 0


def test_relative_norm_histogram_counts_edges_exactly() -> None:
    fig = F.relative_norm_histogram([0.0, 0.0, 0.5, 1.0], bins=4)
    assert list(fig.data[0].y) == [2, 0, 1, 1]  # 1.0 lands in the last bin, 0.5 in the third


def test_relative_norm_histogram_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        F.relative_norm_histogram([0.2, 1.5])
    with pytest.raises(ValueError, match="bins"):
        F.relative_norm_histogram([0.2], bins=0)
    with pytest.raises(ValueError, match="1-D"):
        F.relative_norm_histogram(np.zeros((2, 2)))


def test_relative_norm_histograms_small_multiples() -> None:
    data = {"relu": _n_rel(0), "batchtopk": _n_rel(1).numpy(), "student-kl": _n_rel(2).tolist()}
    fig = F.relative_norm_histograms(data, bins=50, title="architectures")
    assert len(fig.data) == 3 and all(len(t.x) == 50 for t in fig.data)
    assert {t.xaxis for t in fig.data} == {"x", "x2", "x3"}
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:3] == ["relu", "batchtopk", "student-kl"]
    assert len(fig.layout.shapes) == 9 and fig.layout.title.text == "architectures"
    wrapped = F.relative_norm_histograms({str(i): _n_rel(i) for i in range(5)}, cols=2)
    assert len(wrapped.data) == 5 and wrapped.data[4].yaxis == "y5"
    with pytest.raises(ValueError, match="empty"):
        F.relative_norm_histograms({})


def test_cosine_and_cca() -> None:
    fig = F.cosine_histogram(torch.tensor([-1.0, 0.0, 0.5, 1.0]), bins=20, title="cos")
    assert len(fig.data[0].x) == 20 and sum(fig.data[0].y) == 4 and fig.layout.title.text == "cos"
    assert fig.layout.xaxis.range == (-1, 1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        F.cosine_histogram([2.0])
    one = F.cca_spectrum(torch.tensor([0.2, 0.9, 0.5]))
    assert len(one.data) == 1 and list(one.data[0].y) == pytest.approx([0.9, 0.5, 0.2])
    assert one.layout.yaxis.title.text == "canonical correlation"
    two = F.cca_spectrum({"live": [0.9, 0.8], "all": [0.7, 0.1]})
    assert [t.name for t in two.data] == ["live", "all"]


def test_training_curves() -> None:
    rows = [{"step": s, "loss": 1 / (s + 1), "l0": 5 + s} for s in range(10)] + [{"step": 10, "l0": 15}]
    fig = F.training_curves(rows, ["loss", "l0"], log_y=["loss"])
    assert len(fig.data) == 2
    assert len(fig.data[0].x) == 10 and len(fig.data[1].x) == 11
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type != "log"
    assert fig.layout.xaxis2.title.text == "step"
    with pytest.raises(ValueError, match="'ev'"):
        F.training_curves(rows, ["ev"])


def test_strength_scatter_drops_dead_and_says_so() -> None:
    fig = F.strength_scatter([0.0, 0.1, 1.0], [0.5, 0.2, 0.9], labels=["dead", "b", "c"])
    (pts,) = fig.data
    assert list(pts.x) == [0.1, 1.0] and list(pts.text) == ["b", "c"]
    assert fig.layout.xaxis.type == "log"
    assert "1 latents" in fig.layout.annotations[0].text
    assert "data strength" in fig.layout.xaxis.title.text and "n_rel" in fig.layout.yaxis.title.text
    with pytest.raises(ValueError, match="lengths differ"):
        F.strength_scatter([1.0, 2.0], [0.5])


def test_summary_heatmap() -> None:
    table = {"same": {"first": 1.0, "middle": 0.995, "last": 1.0}, "fine-tune": {"first": 0.9, "last": 0.76}}
    fig = F.summary_heatmap(table, title="sharedness")
    (hm,) = fig.data
    assert list(hm.y) == ["same", "fine-tune"] and list(hm.x) == ["first", "middle", "last"]
    assert list(hm.text[0]) == ["1.00", "0.99", "1.00"]
    assert list(hm.text[1]) == ["0.90", "", "0.76"]  # the missing cell is blank, not 'nan'
    assert np.isnan(hm.z[1][1]) and (hm.zmin, hm.zmax) == (0, 1)
    assert fig.layout.title.text == "sharedness"


def test_calibration_and_latent_scaling() -> None:
    fig = F.calibration_curve([0.0, 0.5, 1.0], {"sharedness": [0.1, 0.5, 0.9], "alt": [0.0, 0.4, 1.2]})
    assert [t.name for t in fig.data] == ["sharedness", "alt", "identity"]
    assert list(fig.data[-1].x) == [0.0, 1.2] and list(fig.data[-1].y) == [0.0, 1.2]
    with pytest.raises(ValueError, match="truth has 3"):
        F.calibration_curve([0.0, 0.5, 1.0], {"bad": [0.1]})
    sc = F.latent_scaling_scatter([1, 2, 3], [3, 2, 1], ["a", "b", "c"], xlabel="beta A", ylabel="beta B",
                                  log_x=True)
    assert len(sc.data) == 1 and list(sc.data[0].text) == ["a", "b", "c"]
    assert sc.layout.xaxis.title.text == "beta A" and sc.layout.xaxis.type == "log"


# ----------------------------------------------------------------------------- export

def test_find_chromium_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from choreographer.browsers.chromium import Chromium

    monkeypatch.setattr(Chromium, "find_browser", classmethod(lambda cls, **kw: None))
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    with pytest.raises(RuntimeError, match="apt-get install -y chromium.*BROWSER_PATH"):
        F.find_chromium()


def test_save_figure_rejects_bad_arguments(tmp_path: Path) -> None:
    fig = F.cca_spectrum([0.5])
    with pytest.raises(ValueError, match="svg"):
        F.save_figure(fig, tmp_path / "a", formats=("svg",))
    with pytest.raises(ValueError, match="no format suffix"):
        F.save_figure(fig, tmp_path / "a.png")
    with pytest.raises(ValueError, match="plotlyjs"):
        F.save_figure(fig, tmp_path / "a", formats=("html",), plotlyjs="cdn")
    assert list(tmp_path.iterdir()) == []


def test_failed_png_export_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kaleido

    def boom(*args, **kwargs):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(FX, "_ensure_server", lambda: None)
    monkeypatch.setattr(kaleido, "calc_fig_sync", boom)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        F.save_figure(F.cca_spectrum([0.5]), tmp_path / "out" / "fig", formats=("html", "png"))
    leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert leftovers == []  # the HTML was rendered but not written; no temporary files remain


def test_html_is_deterministic_and_offline(tmp_path: Path) -> None:
    fig = F.relative_norm_histogram(_n_rel())
    (a,) = F.save_figure(fig, tmp_path / "one" / "rel_norm", formats=("html",))
    (b,) = F.save_figure(fig, tmp_path / "two" / "rel_norm", formats=("html",))
    text = a.read_text(encoding="utf-8")
    assert a.read_bytes() == b.read_bytes()
    assert 'id="fig-rel_norm"' in text and "cdn" not in text.lower()
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in text
    bundle = tmp_path / "one" / "plotly.min.js"
    assert bundle.stat().st_size > 1_000_000
    (inline,) = F.save_figure(fig, tmp_path / "three" / "rel_norm", formats=("html",), plotlyjs="inline")
    assert "src=\"plotly.min.js\"" not in inline.read_text(encoding="utf-8")
    assert not (tmp_path / "three" / "plotly.min.js").exists()


_SUBPROCESS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from hidden_signatures.analysis import figure_export as FX
    from hidden_signatures.analysis import figures as F
    g = torch.Generator().manual_seed(0)
    n_rel = torch.cat([torch.rand(30, generator=g) * 0.1, 0.4 + torch.rand(50, generator=g) * 0.2,
                       0.9 + torch.rand(20, generator=g) * 0.1, torch.tensor([float("nan")])])
    F.save_figure(F.relative_norm_histogram(n_rel, name_a="A", name_b="B"), sys.argv[1], width=400, height=300)
""")


@needs_chromium
def test_png_and_html_identical_across_runs_and_processes(tmp_path: Path) -> None:
    fig = F.relative_norm_histogram(_n_rel(), name_a="A", name_b="B")
    first = F.save_figure(fig, tmp_path / "run1" / "rel", width=400, height=300)
    second = F.save_figure(fig, tmp_path / "run2" / "rel", width=400, height=300)
    assert [p.name for p in first] == ["rel.png", "rel.html"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _SUBPROCESS_SCRIPT, str(tmp_path / "proc" / "rel")],
                   check=True, env=env, timeout=120)
    for name in ("rel.png", "rel.html"):
        data = (tmp_path / "run1" / name).read_bytes()
        assert data == (tmp_path / "run2" / name).read_bytes(), f"{name} differs between runs"
        assert data == (tmp_path / "proc" / name).read_bytes(), f"{name} differs between processes"
    png = (tmp_path / "run1" / "rel.png").read_bytes()
    assert _png_size(png) == (400, 300)
    assert b"tIME" not in png  # no timestamp chunk


@needs_chromium
def test_png_size_follows_scale(tmp_path: Path) -> None:
    (png,) = F.save_figure(F.summary_heatmap({"same": {"0": 1.0}}), tmp_path / "heat", formats=("png",),
                           width=300, height=200, scale=2)
    assert _png_size(png.read_bytes()) == (600, 400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png"]


def test_builders_return_figures() -> None:
    built = [F.relative_norm_histogram([0.5]), F.relative_norm_histograms({"a": [0.5]}), F.cosine_histogram([0.1]),
             F.cca_spectrum([0.5]), F.training_curves([{"step": 0, "loss": 1.0}], ["loss"]),
             F.strength_scatter([1.0], [0.5]), F.summary_heatmap({"r": {"c": 0.5}}),
             F.calibration_curve([0.0], {"m": [0.0]}), F.latent_scaling_scatter([1.0], [2.0])]
    assert all(isinstance(fig, go.Figure) for fig in built)
