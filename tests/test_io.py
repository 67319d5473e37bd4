"""io: the file lock that lets two processes share one cached artifact."""

from __future__ import annotations

import time

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
