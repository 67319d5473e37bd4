"""io: the file lock that lets two processes share one cached artifact."""

from __future__ import annotations

import json
import time

import torch

from hidden_signatures import io


def test_file_lock_makes_a_second_holder_wait_until_the_first_lets_go(tmp_path) -> None:
    import threading

    events: list[str] = []
    held = threading.Event()

    def first() -> None:
        with io.file_lock(tmp_path / "store"):
            events.append("first in")
            held.set()
            time.sleep(0.3)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(5)
    with io.file_lock(tmp_path / "store"):
        events.append("second in")
    thread.join()
    assert events == ["first in", "first out", "second in"]
    assert (tmp_path / ".store.lock").exists()


def test_restored_optimizer_state_takes_its_parameters_layout():
    """A parameter with transposed strides (W.T.clone()) and the fused Adam kernel: the state
    restored from safetensors (row-major) is laid out like the parameter, so resuming is exact."""
    def make():
        gen = torch.Generator().manual_seed(0)
        return torch.nn.Parameter(torch.randn(8, 4, generator=gen).T.clone())
    grads = [torch.randn(4, 8, generator=torch.Generator().manual_seed(s)) for s in range(6)]

    def steps(param, opt, gs):
        for g in gs:
            param.grad = g.clone()
            opt.step()

    p1 = make()
    assert not p1.is_contiguous()
    opt1 = torch.optim.Adam([p1], lr=1e-2, fused=True)
    steps(p1, opt1, grads[:3])
    tensors, meta = io.optimizer_tensors(opt1)
    p2 = make()
    with torch.no_grad():
        p2.copy_(p1)
    opt2 = torch.optim.Adam([p2], lr=1e-2, fused=True)
    io.restore_optimizer(opt2, {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    assert opt2.state[p2]["exp_avg"].stride() == p2.stride()
    steps(p1, opt1, grads[3:])
    steps(p2, opt2, grads[3:])
    assert torch.equal(p1, p2)
