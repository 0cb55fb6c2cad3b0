"""Stop signals for the loop: SIGTERM (what systemd sends) and Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

from edgestream.runtime.audio.sources import AudioSource
from edgestream.runtime.loop import StopFlag


def handle_signals(stop: StopFlag, source: AudioSource) -> Callable[[], None]:
    """SIGTERM and the first Ctrl-C stop capture (the line is finalized, exit 0); a second
    Ctrl-C exits at once. Python runs signal handlers only between bytecodes of the main thread,
    so a long onnxruntime call would delay them: the signals are also written to a wakeup pipe
    that a watcher thread reads the moment they arrive. Only the main thread can install
    handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def watch() -> None:
        interrupts = 0
        while data := os.read(read_fd, 64):
            for signum in data:
                if signum == signal.SIGINT:
                    interrupts += 1
                    if interrupts > 1:
                        os._exit(130)
                stop.set("shutdown")
                source.request_stop()

    def on_signal(signum: int, frame: Any) -> None:  # the watcher does the work
        stop.set("shutdown")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="edgestream-signals", daemon=True)
    watcher.start()

    def restore() -> None:
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(write_fd)  # the watcher reads end-of-file and ends
        watcher.join(1.0)
        os.close(read_fd)

    return restore
