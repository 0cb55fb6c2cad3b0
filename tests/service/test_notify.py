"""sd_notify against a real datagram socket: READY after warm-up, WATCHDOG at its cadence from
the loop, none while the loop is stalled; SIGTERM finishes the line and exits 0."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import speech_dir
from service_helpers import NotifySocket, Service, notify_socket  # noqa: F401 (fixture)

from edgestream.runtime.api import load
from edgestream.runtime.audio.sources import PcmStdinSource
from edgestream.runtime.audio.wav import read_wav
from edgestream.runtime.events.sinks import SinkSet
from edgestream.runtime.loop import LoopConfig, run_loop
from edgestream.runtime.service.notify import Notifier


def test_ready_after_warm_up_watchdog_cadence_and_sigterm(real_bundle: Path, tmp_path: Path,
                                                         notify_socket: NotifySocket) -> None:
    events_file = tmp_path / "events.jsonl"
    service = Service(["--bundle", str(real_bundle), "--input",
                       str(speech_dir() / "two_cities.wav"), "--serve", "127.0.0.1:0",
                       "--jsonl", str(events_file), "--threads", "1"],
                      {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "4000000"})
    ready = notify_socket.wait_for("READY", 120)
    ready_at = notify_socket.times("READY")[0]
    assert "warm-up" in ready["STATUS"] and int(ready["MAINPID"]) == service.proc.pid
    assert service.url().startswith("http://127.0.0.1:")
    # the log says how long start-up took, from process start
    assert any("ready in" in line for line in service.err), service.log
    time.sleep(9.0)  # in the middle of the clip's sentences
    stop_at = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    code = service.wait(20)  # the unit's TimeoutStopSec
    stopped_in = time.monotonic() - stop_at
    assert code == 0, service.log
    pings = notify_socket.times("WATCHDOG")
    assert pings and pings[0] >= ready_at  # the loop pings, and only once it runs
    running = [p for p in pings if p <= stop_at]
    gaps = np.diff(running)
    # every half of the 4 s watchdog period (later only by the step in flight, which beats per
    # token), never late enough for systemd to kill the service
    assert 1.95 <= float(np.median(gaps)) <= 3.0 and gaps.max() < 4.0, gaps
    assert notify_socket.times("STOPPING") and notify_socket.times("STOPPING")[0] >= stop_at
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    finals = [e for e in events if e["type"] == "final"]
    # the line that was open at SIGTERM was finished, not lost
    assert finals and finals[-1]["reason"] == "shutdown" and finals[-1]["text"], finals
    assert events[-1]["type"] == "stats"
    assert stopped_in < 10.0, stopped_in
    # privacy: caption text never reached the log
    for f in finals:
        assert f["text"] not in service.log


def test_no_watchdog_ping_while_the_loop_is_stalled(tiny_bundle: Path,
                                                    notify_socket: NotifySocket) -> None:
    """A source that stops delivering (a pipe nobody writes to) stalls the loop: the pings
    stop, so systemd would restart it; they resume when audio flows again."""
    model = load(tiny_bundle, "cpu")
    clip = read_wav(speech_dir() / "beckett.wav")
    pcm = (np.clip(clip.samples[:, 0], -1, 1) * 32767).astype("<i2").tobytes()
    read_fd, write_fd = os.pipe()
    source = PcmStdinSource(clip.sample_rate, 1, os.fdopen(read_fd, "rb"), block_frames=1600)
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"})
    sinks = SinkSet([])
    loop = threading.Thread(target=run_loop, args=(source, model.stream(), sinks, LoopConfig()),
                            kwargs={"heartbeat": notifier.watchdog})
    loop.start()
    step = 1600 * 2  # 0.1 s of audio

    def flow(seconds: float, offset: int) -> int:
        for i in range(int(seconds * 10)):
            os.write(write_fd, pcm[offset + i * step: offset + (i + 1) * step])
            time.sleep(0.1)
        return offset + int(seconds * 10) * step

    offset = flow(1.5, 0)
    stall_from = time.monotonic()
    time.sleep(3.5)
    stall_to = time.monotonic()
    flow(1.5, offset)
    os.close(write_fd)
    loop.join(30)
    sinks.close()
    notifier.close()
    pings = notify_socket.times("WATCHDOG")
    before = [p for p in pings if p < stall_from]
    # the loop first finishes the audio already in the pipe (longer on a loaded machine)
    during = [p for p in pings if stall_from + 1.5 < p < stall_to]
    after = [p for p in pings if p > stall_to]
    assert len(before) >= 4 and len(after) >= 4, pings
    assert during == [], (during, stall_from, stall_to)


def test_outside_systemd_notify_does_nothing() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s == 0
    n.ready("x")
    n.watchdog()
    n.close()


@pytest.mark.parametrize("env, interval", [({"WATCHDOG_USEC": "3000000"}, 1.5),
                                           ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, 0.0)])
def test_watchdog_interval_is_half_the_period_for_this_process(env: dict, interval: float,
                                                               tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "x"), **env})
    assert n.watchdog_interval_s == interval  # WATCHDOG_PID of another process: not ours
    n.close()


def test_a_long_decode_beats_per_token(real_bundle: Path) -> None:
    """One long step (a whole 23 s recording decoded in one call) keeps beating as tokens come,
    so the watchdog sees progress; outside an installed heartbeat nothing beats."""
    from edgestream.runtime import heartbeat

    model = load(real_bundle, "cpu")
    clip = read_wav(speech_dir() / "two_cities.wav")
    beats: list[float] = []
    with heartbeat.installed(lambda: beats.append(time.monotonic())):
        text = model.transcribe(clip.samples, clip.sample_rate)
    tokens = model.bundle.tokenizer.encode(text).ids
    assert len(beats) >= len(tokens) > 40, (len(beats), len(tokens))
    gaps = np.diff(beats)
    assert gaps.max() < 5.0, gaps.max()  # no stretch without a beat longer than one encoder run
    before = len(beats)
    model.transcribe(clip.samples[: clip.sample_rate * 3], clip.sample_rate)
    assert len(beats) == before  # uninstalled: the beats went nowhere
