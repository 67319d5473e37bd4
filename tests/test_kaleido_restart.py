"""Kaleido's start-up race (issue 17): a PNG render that runs before kaleido's page has loaded its script
fails with `ReferenceError: kaleido_scopes is not defined`; figures restarts the server and retries that
error only, a bounded number of times, and the PNG bytes stay those of a normal export."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_chromium

from hidden_signatures.analysis import figure_export as FX

from hidden_signatures.analysis import figures as F

# str() of the JavascriptError kaleido 1.5.1 raised here when a render ran before its page's script
REAL_MESSAGE = (
    "{'result': {'type': 'object', 'subtype': 'error', 'className': 'ReferenceError', 'description': "
    "'ReferenceError: kaleido_scopes is not defined\\n    at <anonymous>:1:26', 'objectId': "
    "'-8779238672557675660.1.1'}, 'exceptionDetails': {'exceptionId': 1, 'text': 'Uncaught', 'lineNumber': 0, "
    "'columnNumber': 25, 'scriptId': '8'}}")
OTHER_JS_MESSAGE = ("{'result': {'type': 'object', 'subtype': 'error', 'className': 'TypeError', 'description': "
                    "\"TypeError: Cannot read properties of undefined (reading 'data')\"}}")
SIZE = {"width": 300, "height": 200, "scale": 1}




def _figure() -> Any:
    """A small figure whose PNG every test here compares."""
    return F.cca_spectrum([0.95, 0.8, 0.55, 0.3, 0.1], title="restart")


def _png() -> bytes:
    """PNG bytes of `_figure()` through figures' export path."""
    return FX._render_png(_figure(), **SIZE)


def _page_not_ready() -> Exception:
    """The exception kaleido raises when it renders before its page's script has run (real type and text)."""
    from kaleido.errors import JavascriptError

    return JavascriptError(REAL_MESSAGE)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short waits between attempts, so the tests spend their time rendering."""
    monkeypatch.setattr(FX, "RESTART_BACKOFF_S", (0.01, 0.02))


@pytest.fixture(scope="module")
def reference_png() -> bytes:
    """A normal export of `_figure()` on a server started as figures starts it (once per module)."""
    FX._stop_server()
    return _png()


@pytest.fixture
def restarts(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record every real stop of the shared server (the first half of a restart)."""
    calls: list[float] = []
    real = FX._stop_server

    def spy() -> None:
        calls.append(time.monotonic())
        real()

    monkeypatch.setattr(FX, "_stop_server", spy)
    return calls


def _fail_first(monkeypatch: pytest.MonkeyPatch, times: int, error: Callable[[], Exception]) -> list[int]:
    """Make kaleido.calc_fig_sync raise `error()` on its first `times` calls, then render for real."""
    import kaleido

    real, calls = kaleido.calc_fig_sync, []

    def flaky(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        if len(calls) <= times:
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(kaleido, "calc_fig_sync", flaky)
    return calls


@pytest.fixture
def stale_load_event(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Reproduce the race itself: the next navigate() of a kaleido tab finds its load event already fired.

    That is what Chromium's start-up page does when its load event arrives after kaleido subscribed:
    kaleido's `_KaleidoTab.navigate` returns while its own page is still loading.
    """
    from kaleido._kaleido_tab import _tab

    real, used = _tab._subscribe_new, []

    def stale(tab: Any, event: str) -> Any:
        future = real(tab, event)
        if event == "Page.loadEventFired" and not used:
            used.append(1)
            future.set_result({"method": event, "params": {"stale": True}})
        return future

    monkeypatch.setattr(_tab, "_subscribe_new", stale)
    FX._stop_server()  # the next render starts a server, whose first navigate gets the stale event
    yield used
    FX._stop_server()  # leave no server behind that was started under the patch


def _descendants(root: int) -> dict[int, str]:
    """pid -> argv[0] of every live process below `root` (from /proc; Linux only)."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv0 = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry)] = (int(fields[1]), argv0)
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, (ppid, argv0) in parents.items():
            if ppid == pid and child not in found:
                found[child] = argv0
                frontier.append(child)
    return found


def _browsers() -> list[int]:
    """pids of Chromium browser processes started by this process (not their renderers and helpers)."""
    procs = _descendants(os.getpid())
    chromium = {pid for pid, argv0 in procs.items() if Path(argv0).name.startswith("chrom")}
    return sorted(pid for pid in chromium if not _parent_in(pid, chromium))


def _parent_in(pid: int, pids: set[int]) -> bool:
    """True if the parent of `pid` is one of `pids`."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) in pids
    except OSError:
        return False


# ----------------------------------------------------------------------------- no browser needed

def test_only_the_page_not_ready_error_is_recognised() -> None:
    from kaleido.errors import JavascriptError, KaleidoError

    assert FX._is_page_not_ready(_page_not_ready())
    assert not FX._is_page_not_ready(JavascriptError(OTHER_JS_MESSAGE))
    assert not FX._is_page_not_ready(RuntimeError(REAL_MESSAGE))  # the text alone is not enough
    assert not FX._is_page_not_ready(KaleidoError(525, "kaleido_scopes: plotly failed"))
    assert not FX._is_page_not_ready(JavascriptError("ReferenceError: Plotly is not defined"))


def test_persistent_page_not_ready_gives_up_with_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from kaleido.errors import JavascriptError

    stops: list[int] = []
    monkeypatch.setattr(FX, "_ensure_server", lambda: None)
    monkeypatch.setattr(FX, "_stop_server", lambda: stops.append(1))
    calls = _fail_first(monkeypatch, times=10**6, error=_page_not_ready)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"PNG export failed.*kaleido_scopes is not defined.*all 3 attempts") as info:
        F.save_figure(_figure(), Path("/nonexistent/never-written"), formats=("png",))
    assert len(calls) == FX.RENDER_ATTEMPTS == 3 and len(stops) == 3  # bounded; left stopped for a fresh start
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, JavascriptError)
    assert time.monotonic() - start < 5


def _other_js_error() -> Exception:
    """A JavaScript error of the page that is not the start-up race."""
    from kaleido.errors import JavascriptError

    return JavascriptError(OTHER_JS_MESSAGE)


def _kaleido_error() -> Exception:
    """An error reported by kaleido_scopes.js itself (a bad figure)."""
    from kaleido.errors import KaleidoError

    return KaleidoError(525, "bad figure")


def _crash_with_same_text() -> Exception:
    """Another error type whose text happens to contain the race's message."""
    return RuntimeError("renderer crashed: " + REAL_MESSAGE)


@pytest.mark.parametrize("error", [_other_js_error, _kaleido_error, _crash_with_same_text],
                         ids=["other-js-error", "kaleido-error", "runtime-error-same-text"])
def test_unrelated_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch, error: Callable[[], Exception]) -> None:
    stops: list[int] = []
    monkeypatch.setattr(FX, "_ensure_server", lambda: None)
    monkeypatch.setattr(FX, "_stop_server", lambda: stops.append(1))
    calls = _fail_first(monkeypatch, times=10**6, error=error)
    with pytest.raises(type(error())) as info:
        _png()
    assert str(info.value) == str(error())  # raised as it came, not wrapped
    assert len(calls) == 1 and stops == []


# ----------------------------------------------------------------------------- real Chromium

@needs_chromium
def test_page_not_ready_restarts_and_gives_the_same_png(monkeypatch: pytest.MonkeyPatch, reference_png: bytes,
                                                       restarts: list[float]) -> None:
    calls = _fail_first(monkeypatch, times=FX.RENDER_ATTEMPTS - 1, error=_page_not_ready)
    assert _png() == reference_png  # the last allowed attempt succeeds
    assert len(calls) == FX.RENDER_ATTEMPTS and len(restarts) == FX.RENDER_ATTEMPTS - 1
    assert _png() == reference_png and len(restarts) == FX.RENDER_ATTEMPTS - 1  # the new server keeps serving
    assert len(_browsers()) == 1  # the stopped servers' Chromiums were closed, not leaked


def _kaleido_version() -> tuple[int, ...]:
    """The installed kaleido's version as numbers (1.5.2 -> (1, 5, 2))."""
    text = importlib.metadata.version("kaleido")
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@needs_chromium
@pytest.mark.skipif(_kaleido_version() >= (1, 5, 2),
                    reason="kaleido >= 1.5.2 navigates by waiting for the load event of its own navigation "
                           "(frame and loader ids), so Chromium's start-up page can no longer release it early: "
                           "the race this provokes is fixed upstream; figures' retry stays for older kaleido")
def test_render_during_page_load_recovers(reference_png: bytes, stale_load_event: list[int],
                                          monkeypatch: pytest.MonkeyPatch, restarts: list[float]) -> None:
    """The real race in a real Chromium: kaleido itself raises the error, figures restarts and retries."""
    from kaleido.errors import JavascriptError

    seen: list[BaseException] = []
    real_check = FX._is_page_not_ready
    monkeypatch.setattr(FX, "_is_page_not_ready", lambda exc: seen.append(exc) or real_check(exc))
    assert _png() == reference_png
    assert stale_load_event == [1]
    assert len(seen) == 1 and isinstance(seen[0], JavascriptError) and FX.PAGE_NOT_READY in str(seen[0])
    assert len(restarts) == 1


_EXIT_SCRIPT = textwrap.dedent("""
    import os, sys
    from kaleido._kaleido_tab import _tab
    from hidden_signatures.analysis import figure_export as FX
    from hidden_signatures.analysis import figures as F
    sys.path.insert(0, sys.argv[1])
    import test_kaleido_restart as T

    real, used = _tab._subscribe_new, []
    def stale(tab, event):
        future = real(tab, event)
        if event == "Page.loadEventFired" and not used:
            used.append(1)
            future.set_result({"method": event})
        return future
    _tab._subscribe_new = stale
    assert T._png()[:4] == b"\\x89PNG" and used == [1]
    print(" ".join(map(str, T._descendants(os.getpid()))))
""")


@needs_chromium
def test_restarted_server_is_stopped_at_exit(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(Path(__file__).parent)], check=True,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path).stdout
    pids = [int(p) for p in out.split()]
    assert pids, "the exporting process started no Chromium"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == [], f"Chromium processes left after the interpreter exited: {alive}"


def _busy_loops(n: int) -> list[subprocess.Popen]:
    """Start `n` CPU-bound Python processes (the load under which the race was seen)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@needs_chromium
@pytest.mark.slow
def test_fresh_servers_under_cpu_load_always_export(reference_png: bytes, restarts: list[float]) -> None:
    """Stress: start a server and render at once, repeatedly, beside two busy loops (about 5% of starts
    hit the race here); every export must succeed with the same bytes. Bounded to about 20 s."""
    loops = _busy_loops(2)
    try:
        deadline, results = time.monotonic() + 15, []
        while time.monotonic() < deadline or len(results) < 2:
            FX._stop_server()
            results.append(_png())
    finally:
        for proc in loops:
            proc.kill()
            proc.wait(timeout=10)
    assert all(png == reference_png for png in results)
    print(f"{len(results)} fresh servers, {len(restarts) - len(results)} restarts after the race")
