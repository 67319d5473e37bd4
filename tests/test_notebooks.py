"""Executing one notebook (run/notebooks.py): the kernel is shut down without an interrupt first."""

from __future__ import annotations

import json
import signal

from hidden_signatures.run import notebooks

NOTEBOOK = """# %% tags=["parameters"]
x = 1

# %%
print("twice", 2 * x)
"""


def test_a_finished_notebooks_kernel_is_shut_down_without_sigint(tmp_path, monkeypatch) -> None:
    """jupyter_client sends SIGINT before its shutdown request; an idle kernel then logged
    "KeyboardInterrupt caught in kernel." as an ERROR in some of the run's logs."""
    sent: list[int] = []

    class Spy(notebooks.QuietShutdownKernelManager):
        async def _async_signal_kernel(self, signum: int) -> None:
            sent.append(signum)
            await super()._async_signal_kernel(signum)

    monkeypatch.setattr(notebooks, "QuietShutdownKernelManager", Spy)
    source = tmp_path / "nb.py"
    source.write_text(NOTEBOOK)
    out = tmp_path / "out" / "nb.ipynb"
    notebooks.execute(source, out, {"x": 21}, tmp_path)
    cells = json.loads(out.read_text())["cells"]
    assert any("twice 42" in "".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))
    assert signal.SIGINT not in sent, sent
