"""Byte-reproducible export of plotly figures: PNG through kaleido's Chromium, standalone HTML.

PNG export needs a Chromium (kaleido 1.x drives one); one kaleido server is started per
process, after which an image costs about 0.1 s. Kaleido can start rendering before its page's
script has loaded (a stale load event on a busy machine, see `_is_page_not_ready`); that one
error restarts the server and retries, a bounded number of times.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from ..io import write_bytes, write_text

FORMATS = ("png", "html")
PLOTLYJS_MODES = ("directory", "inline")
PLOTLYJS_BUNDLE = "plotly.min.js"
INSTALL_HINT = ("no Chromium found for PNG export (kaleido 1.x needs one): run `apt-get install -y chromium`, "
                "or set BROWSER_PATH to a Chrome/Chromium executable, or run `kaleido_get_chrome`")

# kaleido's start-up race (see _is_page_not_ready): attempts per PNG, and the waits (s) before attempts 2 and 3
RENDER_ATTEMPTS = 3
RESTART_BACKOFF_S = (0.5, 2.0)
PAGE_NOT_READY = "ReferenceError: kaleido_scopes is not defined"

_server_lock = threading.Lock()
_server_started = False


def find_chromium() -> str:
    """Path of the Chrome/Chromium kaleido will drive; RuntimeError saying what to install if there is none."""
    from choreographer.browsers.chromium import Chromium

    path = Chromium.find_browser(skip_local=False)
    if path and Path(path).is_file() and os.access(path, os.X_OK):
        return str(path)
    env_path = os.environ.get("BROWSER_PATH")
    where = f" (BROWSER_PATH={env_path!r} is not an executable)" if env_path else ""
    raise RuntimeError(INSTALL_HINT + where)


def _ensure_server() -> None:
    """Start kaleido's per-process sync server once; check for Chromium first (a missing one would hang it)."""
    global _server_started
    if _server_started:
        return
    import kaleido

    path = find_chromium()
    # mathjax=False: the default loads MathJax from a CDN, which is unreachable offline
    kaleido.start_sync_server(path=path, mathjax=False, silence_warnings=True)
    _server_started = True


def _stop_server() -> None:
    """Stop the shared kaleido server and its Chromium, so that the next render starts a fresh one."""
    global _server_started
    import kaleido

    kaleido.stop_sync_server(silence_warnings=True)
    _server_started = False


def _is_page_not_ready(exc: BaseException) -> bool:
    """True only for kaleido's start-up race: a render ran before the page's script defined `kaleido_scopes`.

    kaleido's `_KaleidoTab.navigate` waits for any `Page.loadEventFired` on the tab; the load event of
    Chromium's own start-up page, arriving late on a busy machine, releases it while kaleido's page still loads.
    """
    from kaleido.errors import JavascriptError

    return isinstance(exc, JavascriptError) and PAGE_NOT_READY in str(exc)


def _render_once(fig: go.Figure, opts: dict[str, Any]) -> bytes:
    """One render on the shared server, started first if it is not running."""
    import kaleido

    _ensure_server()
    return kaleido.calc_fig_sync(fig, opts=opts)


def _render_png(fig: go.Figure, width: int, height: int, scale: float) -> bytes:
    """PNG bytes of `fig` from the shared kaleido server (serialised: the server is one queue).

    On kaleido's start-up race only, the server is restarted and the render retried (RENDER_ATTEMPTS
    in all); any other error propagates at once. The server is stopped at exit by kaleido's atexit hook.
    """
    opts = {"format": "png", "width": width, "height": height, "scale": scale}
    with _server_lock:
        for attempt in range(1, RENDER_ATTEMPTS + 1):
            try:
                return _render_once(fig, opts)
            except Exception as exc:
                if not _is_page_not_ready(exc):
                    raise
                _stop_server()
                if attempt == RENDER_ATTEMPTS:
                    raise RuntimeError(
                        f"PNG export failed: kaleido rendered before its page had loaded ({PAGE_NOT_READY!r}) "
                        f"in all {RENDER_ATTEMPTS} attempts, its Chromium restarted after each") from exc
                time.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S)) - 1])
    raise AssertionError("unreachable: every attempt returns or raises")


def _div_id(stem: str) -> str:
    """A fixed HTML div id from the file name, so HTML bytes do not depend on a random uuid."""
    return "fig-" + re.sub(r"[^A-Za-z0-9_-]", "-", stem)


def _render_html(fig: go.Figure, stem: str, plotlyjs: str) -> str:
    """Full standalone HTML with a fixed div id; plotly.js inline or from a bundle in the same directory."""
    include = True if plotlyjs == "inline" else "directory"
    return pio.to_html(fig, full_html=True, include_plotlyjs=include, include_mathjax=False,
                       div_id=_div_id(stem), config={"displaylogo": False})


def _write_bundle(directory: Path) -> None:
    """Write plotly.min.js beside HTML figures (once; rewritten only if it differs), atomically."""
    from plotly.offline import get_plotlyjs

    bundle, text = directory / PLOTLYJS_BUNDLE, get_plotlyjs()
    if not bundle.is_file() or bundle.read_text(encoding="utf-8") != text:
        write_text(bundle, text)


def save_figure(fig: go.Figure, path: str | os.PathLike, formats: Sequence[str] = FORMATS, *, width: int = 900,
                height: int = 500, scale: float = 1, plotlyjs: str = "directory") -> list[Path]:
    """Write `fig` as <path>.png / <path>.html, byte-identical across runs; every file rendered before any is written.

    plotlyjs="directory" puts one plotly.min.js beside the HTML (works offline, ~4.6 MB once per
    directory); "inline" embeds it in every HTML file instead.
    """
    base = Path(path)
    if base.suffix.lower() in {f".{f}" for f in FORMATS}:
        raise ValueError(f"path must have no format suffix (got {str(base)!r}); formats={tuple(formats)} add it")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats {tuple(formats)!r} not supported; accepted: {FORMATS} "
                         "(svg/pdf are not byte-reproducible)")
    if plotlyjs not in PLOTLYJS_MODES:
        raise ValueError(f"plotlyjs={plotlyjs!r} not supported; accepted: {PLOTLYJS_MODES}")
    if width < 10 or height < 10 or scale <= 0:
        raise ValueError(f"width/height must be >= 10 px and scale > 0, got {width}x{height} scale {scale}")
    payloads: dict[str, bytes | str] = {}
    for fmt in dict.fromkeys(formats):
        payloads[fmt] = (_render_png(fig, width, height, scale) if fmt == "png"
                         else _render_html(fig, base.name, plotlyjs))
    written = []
    for fmt, payload in payloads.items():
        out = base.parent / f"{base.name}.{fmt}"
        if isinstance(payload, bytes):
            write_bytes(out, payload)
        else:
            write_text(out, payload)
        written.append(out)
    if "html" in payloads and plotlyjs == "directory":
        _write_bundle(base.parent)
    return written
