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
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

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
             stop: StopFlag | None = None) -> int:
    """Stream `source` until it ends, stops or fails; returns the exit code (0 ok, 1 fault)."""
    stop = stop if stop is not None else StopFlag()
    rate = source.sample_rate
    started = time.monotonic()
    fed = 0  # source frames fed or lost
    max_lag = 0.0
    next_stats = config.stats_every_s or float("inf")
    code = 0
    try:
        for block in source:
            gap = source.take_gap()
            if gap:
                fed += gap
                sinks.emit(stream.gap(gap / rate))
            sinks.emit(stream.feed(block, rate))
            fed += block.shape[0]
            if config.live:
                lag = time.monotonic() - started - fed / rate
                max_lag = max(max_lag, lag)
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
        source.close()
    sinks.emit([stream.stats_event(**_source_stats(source), max_lag_s=round(max_lag, 3))])
    return code


def _source_stats(source: AudioSource) -> dict[str, int]:
    c = source.counters()
    return {"mic_overruns": int(c.get("input_overflows", 0)),
            "dropped_blocks": int(c.get("dropped_blocks", 0))}
