"""The device loop: source blocks -> stream -> sinks, for a service life.

- Live sources (a microphone, a file paced like one) hold a bounded backlog that drops its
  oldest audio; each hole becomes a `gap` (the stream finalizes the line before it), and lag is
  measured against the wall clock, dropped audio included. While the backlog is large the stream
  makes no partials (finals stay exact), so a model slower than real time still captions.
- Sinks never block the loop (`SinkSet`: a bounded queue per run, written by its own thread); a
  closed pipe ends the run cleanly.
- A stop request (SIGTERM, the first Ctrl-C) ends capture; the open line is finalized and the
  sinks are flushed. An exception in a step becomes a fatal `error` event.
- Statistics live in fixed-size histograms: weeks of audio do not grow memory.
- A source that survives device loss (`ReopeningMic`) reports `mic_lost` / `mic_restored`: the
  open line is finalized at the loss and the hole becomes a gap, so no line spans it. An empty
  block is the source saying "alive, nothing to read" (it waits for the device), so the
  heartbeat (the systemd watchdog ping) keeps going while a stalled step stops it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from edgestream.runtime import heartbeat as heartbeats
from edgestream.runtime.api import Stream
from edgestream.runtime.audio.sources import AudioSource
from edgestream.runtime.events.sinks import SinkSet
from edgestream.runtime.events.types import ErrorEvent, Notice

log = logging.getLogger(__name__)

BEHIND_S = 1.0  # live lag above which partials pause


@dataclass(frozen=True)
class LoopConfig:
    stats_every_s: float = 0.0
    live: bool = False  # the source is paced by a clock: measure lag against it
    speed: float = 1.0  # that clock's speed (a file played faster than real time)


@dataclass
class LoopStatus:
    """What the loop last did; /healthz and /metrics read it from other threads (plain
    attribute writes, no lock: a reader may see a value one block old)."""

    stream: Stream | None = None
    source: AudioSource | None = None
    last_block_at: float = field(default_factory=time.monotonic)  # monotonic
    lag_s: float = 0.0
    max_lag_s: float = 0.0
    mic_up: bool = True
    mic_losses: int = 0
    running: bool = False


class StopFlag:
    """Set from a signal handler; the loop and the source check it between blocks."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "shutdown"

    def set(self, reason: str = "shutdown") -> None:
        self.reason = reason
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


def run_loop(source: AudioSource, stream: Stream, sinks: SinkSet, config: LoopConfig,
             stop: StopFlag | None = None, status: LoopStatus | None = None,
             heartbeat: Callable[[], None] = lambda: None) -> int:
    """Stream `source` until it ends, stops or fails; returns the exit code (0 ok, 1 fault).
    `heartbeat` is called after every block the loop handled, while the source waits, and per
    decoded token (runtime/heartbeat.py): a long step that progresses is not a stall."""
    stop = stop if stop is not None else StopFlag()
    status = status if status is not None else LoopStatus()
    status.stream, status.source, status.running = stream, source, True
    with heartbeats.installed(heartbeat):
        return _run(source, stream, sinks, config, stop, status, heartbeat)


def _run(source: AudioSource, stream: Stream, sinks: SinkSet, config: LoopConfig,
         stop: StopFlag, status: LoopStatus, heartbeat: Callable[[], None]) -> int:
    rate = source.sample_rate
    started = time.monotonic()
    fed = 0  # source frames fed or lost
    max_lag = 0.0
    next_stats = config.stats_every_s or float("inf")
    code = 0
    try:
        for block in source:
            for kind, message in _take_notices(source):
                _device_notice(kind, message, stream, sinks, status)
            status.last_block_at = time.monotonic()
            heartbeat()
            if not block.shape[0]:  # the source is waiting (for a lost device to return)
                if stop or sinks.closed:
                    break
                continue
            gap = source.take_gap()
            if gap:
                fed += gap
                sinks.emit(stream.gap(gap / rate))
            sinks.emit(stream.feed(block, rate))
            fed += block.shape[0]
            if config.live:
                lag = time.monotonic() - started - fed / rate / config.speed
                max_lag = max(max_lag, lag)
                status.lag_s, status.max_lag_s = lag, max_lag
                if (lag > BEHIND_S) != stream.behind:
                    stream.behind = lag > BEHIND_S
                    sinks.emit([Notice(stream.gate.now, "behind" if stream.behind else
                                       "caught_up", f"captions trail the audio by {lag:.1f} s"
                                       if stream.behind else "captions are live again")])
            if stream.gate.now >= next_stats:
                sinks.emit([stream.stats_event(**_source_stats(source), max_lag_s=round(
                    max_lag, 3))])
                # past the current time (a gap can jump several intervals at once)
                next_stats = (stream.gate.now // config.stats_every_s + 1) * config.stats_every_s
            if stop or sinks.closed:
                break
        if getattr(source, "lost", False):
            sinks.emit([Notice(stream.gate.now, "mic_lost", "the capture device stopped "
                               "delivering audio (unplugged or failed); the pending line is "
                               "finalized and the run ends with exit code 3")])
        sinks.emit(stream.finish(stop.reason if stop else "end_of_input"))
    except Exception as e:  # a fault in a step: say so on the event stream, then exit non-zero
        log.exception("stream step failed")
        sinks.emit([ErrorEvent(stream.gate.now, f"{type(e).__name__}: {e}", fatal=True)])
        code = 1
    finally:
        status.running = False
        source.close()
    sinks.emit([stream.stats_event(**_source_stats(source), max_lag_s=round(max_lag, 3))])
    return code


def _take_notices(source: AudioSource) -> list[tuple[str, str]]:
    take = getattr(source, "take_notices", None)
    return take() if take is not None else []


def _device_notice(kind: str, message: str, stream: Stream, sinks: SinkSet,
                   status: LoopStatus) -> None:
    """A lost device finalizes the open line now (its words are not held hostage until the
    device returns); the hole itself arrives as a gap with the first block after it."""
    sinks.emit([Notice(stream.gate.now, kind, message)])
    if kind == "mic_lost":
        status.mic_up = False
        status.mic_losses += 1
        sinks.emit(stream.end_line("mic_lost"))
    elif kind == "mic_restored":
        status.mic_up = True
    log.warning("%s: %s", kind, message)


def _source_stats(source: AudioSource) -> dict[str, int]:
    c = source.counters()
    return {"mic_overruns": int(c.get("input_overflows", 0)),
            "dropped_blocks": int(c.get("dropped_blocks", 0))}
