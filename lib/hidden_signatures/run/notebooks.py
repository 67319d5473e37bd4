"""Executing one Jupytext notebook with papermill: the unit of work of the runner and of each scheduled job."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager


class QuietShutdownKernelManager(AsyncKernelManager):
    """papermill's kernel manager, minus the SIGINT jupyter_client sends a kernel just before asking it
    to shut down: the kernel is idle by then (the notebook has run), and the interrupt made some logs
    end in "[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel." for nothing. A kernel that does
    not exit on the shutdown request is still killed (jupyter_client's own fallback)."""

    async def _async_interrupt_kernel(self) -> None:
        if getattr(self, "shutting_down", False):  # set by shutdown_kernel before it interrupts
            return
        await super()._async_interrupt_kernel()


def execute(notebook: Path, output: Path, parameters: dict, cwd: Path) -> None:
    """Execute a Jupytext .py notebook with papermill into an executed .ipynb.

    The kernel talks over Unix sockets in a private temporary directory, not TCP ports: kernels
    started side by side (schedule.py) cannot race for a port, and nothing listens on the network.
    """
    import jupytext
    import papermill
    from traitlets.config import Config

    nb = jupytext.read(notebook)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hs-kernel-") as sockets:  # one private socket dir per kernel
        ipc = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "kernel")}})
        # papermill writes the notebook as it goes: a failed run leaves the failing cell to read.
        papermill.execute_notebook(nb, str(output), parameters=parameters, cwd=str(cwd),
                                   kernel_name="python3", progress_bar=False, log_output=True,
                                   stdout_file=sys.stdout, stderr_file=sys.stderr, config=ipc,
                                   kernel_manager_class=QuietShutdownKernelManager)
