"""Helpers for the service tests (imported by them; not a conftest, whose name the top-level
one owns): a real sd_notify datagram socket, and the service started as
systemd would start it (a subprocess with NOTIFY_SOCKET and WATCHDOG_USEC)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

EDGESTREAM = [sys.executable, "-m", "edgestream.runtime.cli"]


class NotifySocket:
    """The systemd side of sd_notify: every datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def times(self, key: str) -> list[float]:
        return [t for t, f in self.messages if key in f]

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for _, fields in self.messages:
                if key in fields:
                    return fields
            time.sleep(0.05)
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self._stop = True
        self._thread.join(1)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


class Service:
    """`edgestream service ...` as a child process; stderr is collected for its log lines."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(EDGESTREAM + ["service", *args], env={**os.environ, **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self.out: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stderr, self.err),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stdout, self.out),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(pipe, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in pipe:
            lines.append(line)

    def url(self, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.err:
                m = re.search(r"kiosk page at (http://\S+)", line)
                if m:
                    return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("the service never served its page:\n" + "".join(self.err))

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            for t in self._threads:
                t.join(2)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(2)
        return code

    @property
    def log(self) -> str:
        return "".join(self.err)
