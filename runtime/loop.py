"""The device loop: source blocks -> mono -> model rate -> exact chunks -> driver -> sinks.

The loop never blocks the capture callback (the mic source only queues raw bytes); when compute
falls behind, queued audio is simply fed in larger pieces and the driver decodes once for all of
it, so latency cannot grow without bound.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from edgestream.runtime.events.types import Event, Notice, Stats
from edgestream.runtime.audio.resample import StreamingResampler
from edgestream.runtime.events.sinks import Sink
from edgestream.runtime.audio.sources import AudioSource
from edgestream.runtime.events.stats import StreamStats
from edgestream.runtime.audio.wav import to_mono

log = logging.getLogger(__name__)

LAG_WARN_S = 2.0


class Driver(Protocol):
    final_latencies_ms: list[float]  # end of speech -> final, ms (waiting + compute)
    final_compute_ms: list[float]  # compute spent producing each endpoint final

    def feed(self, audio: np.ndarray) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


@dataclass(frozen=True)
class LoopConfig:
    sample_rate: int
    chunk_samples: int
    stats_every_s: float = 0.0


class Chunker:
    """Cuts a stream of arbitrary blocks into exact `size`-sample chunks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, audio: np.ndarray) -> list[np.ndarray]:
        buf = np.concatenate([self._pending, audio]) if self._pending.size else audio
        n = buf.size // self.size
        chunks = [buf[i * self.size: (i + 1) * self.size] for i in range(n)]
        self._pending = buf[n * self.size:]
        return chunks

    def rest(self) -> np.ndarray:
        rest, self._pending = self._pending, np.zeros(0, dtype=np.float32)
        return rest


def run_loop(source: AudioSource, driver: Driver, sinks: Sequence[Sink],
             config: LoopConfig) -> dict:
    """Stream `source` through `driver` until the source ends; returns the final stats."""
    stats = StreamStats(config.sample_rate)
    resampler = StreamingResampler(source.sample_rate, config.sample_rate)
    chunker = Chunker(config.chunk_samples)
    next_stats = config.stats_every_s or float("inf")

    def emit(events: list[Event]) -> None:
        for event in events:
            for sink in sinks:
                sink.emit(event)

    def step(chunk: np.ndarray) -> None:
        started = time.perf_counter()
        events = driver.feed(chunk)
        stats.record(chunk.size, (time.perf_counter() - started) * 1000.0)
        emit(events)

    started = time.monotonic()
    max_lag = 0.0
    behind = False
    for block in source:
        for chunk in chunker.push(resampler.process(to_mono(block))):
            step(chunk)
        t = stats.audio_samples / config.sample_rate
        # for live input, wall time minus audio time is how far captions trail the speaker
        lag = time.monotonic() - started - t
        max_lag = max(max_lag, lag)
        if lag > LAG_WARN_S and not behind:
            emit([Notice(t, "behind", f"captions trail the audio by {lag:.1f} s; the driver "
                         "decodes less often until it catches up")])
        behind = lag > LAG_WARN_S
        if t >= next_stats:
            emit([Stats(t, {**stats.summary(driver.final_latencies_ms, source.counters(),
                                           driver.final_compute_ms),
                            "max_lag_s": round(max_lag, 3)})])
            next_stats += config.stats_every_s
    if getattr(source, "lost", False):
        emit([Notice(stats.audio_samples / config.sample_rate, "mic_lost",
                     "the capture device stopped delivering audio (unplugged or failed); the "
                     "pending line is finalized and the run ends with exit code 3")])
    tail = np.concatenate([chunker.rest(), resampler.flush()])
    if tail.size:
        step(tail)
    emit(driver.finish())
    summary = {**stats.summary(driver.final_latencies_ms, source.counters(),
                                           driver.final_compute_ms),
               "max_lag_s": round(max_lag, 3)}
    emit([Stats(stats.audio_samples / config.sample_rate, summary)])
    return summary
