"""Liveness for watchdogs, per thread.

The loop beats after every block it handles; a long computation on the same thread (a decode
of many tokens) beats per token. So a step that takes long but progresses keeps the systemd
watchdog fed, while a thread that is stuck (a blocked read, a hung call) stops beating.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_local = threading.local()


def beat() -> None:
    fn = getattr(_local, "fn", None)
    if fn is not None:
        fn()


@contextlib.contextmanager
def installed(fn: Callable[[], None]) -> Iterator[None]:
    """`fn` is what a beat does on this thread (e.g. a rate-limited WATCHDOG=1), while inside."""
    previous = getattr(_local, "fn", None)
    _local.fn = fn
    try:
        yield
    finally:
        _local.fn = previous
