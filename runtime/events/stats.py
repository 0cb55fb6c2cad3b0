"""Streaming statistics in bounded memory: a stream that runs for weeks does not grow.

Latencies go into fixed log-spaced histograms (percentiles read from the bucket bounds, exact to
about 5 %), counters are plain integers.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import numpy as np


class Histogram:
    """Counts of values (ms) in log-spaced buckets from 0.01 ms to about 3 h, plus min/max/sum."""

    RATIO = 1.1  # bucket width: percentiles are within 10 % (reported at the bucket's middle)
    LOW = 0.01
    # exact counts at round bounds, for Prometheus (`le` in ms; the last bucket is +Inf)
    BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)

    def __init__(self) -> None:
        n = int(math.log(1e7 / self.LOW) / math.log(self.RATIO)) + 2
        self.counts = np.zeros(n, dtype=np.int64)
        self.coarse = np.zeros(len(self.BOUNDS_MS) + 1, dtype=np.int64)
        self.total = 0.0
        self.n = 0
        self.max = 0.0

    def add(self, value: float) -> None:
        v = max(value, self.LOW)
        i = min(self.counts.size - 1, int(math.log(v / self.LOW) / math.log(self.RATIO)) + 1)
        self.counts[i] += 1
        self.coarse[bisect.bisect_left(self.BOUNDS_MS, value)] += 1
        self.total += value
        self.n += 1
        self.max = max(self.max, value)

    def percentile(self, q: float) -> float:
        if not self.n:
            return 0.0
        rank = q / 100.0 * (self.n - 1)
        i = int(np.searchsorted(np.cumsum(self.counts), rank, side="right"))
        mid = self.LOW * self.RATIO ** (i - 0.5) if i else self.LOW
        return min(mid, self.max)


class StreamStats:
    """What one stream cost; `summary()` is the stats event's payload."""

    def __init__(self, sample_rate: int) -> None:
        self.rate = sample_rate
        self.chunks = 0
        self.audio_samples = 0
        self.compute_ms = 0.0
        self.step_ms = Histogram()
        self.eos_to_final_ms = Histogram()  # end of speech -> final (silence waited + compute)
        self.final_compute_ms = Histogram()  # compute after the endpoint decision

    def record(self, samples: int, compute_ms: float) -> None:
        self.chunks += 1
        self.audio_samples += samples
        self.compute_ms += compute_ms
        self.step_ms.add(compute_ms)

    def record_final(self, latency_ms: float, compute_ms: float) -> None:
        self.eos_to_final_ms.add(latency_ms)
        self.final_compute_ms.add(compute_ms)

    def summary(self, **extra: Any) -> dict[str, Any]:
        audio_s = self.audio_samples / self.rate
        out: dict[str, Any] = {
            "chunks": self.chunks,
            "audio_s": round(audio_s, 3),
            "compute_s": round(self.compute_ms / 1000.0, 3),
            "rtf": round(self.compute_ms / 1000.0 / audio_s, 4) if audio_s else 0.0,
            "step_ms_p50": round(self.step_ms.percentile(50), 2),
            "step_ms_p95": round(self.step_ms.percentile(95), 2),
            "step_ms_p99": round(self.step_ms.percentile(99), 2),
            "step_ms_max": round(self.step_ms.max, 2),
        }
        if self.eos_to_final_ms.n:
            out["eos_to_final_ms_p50"] = round(self.eos_to_final_ms.percentile(50), 1)
            out["eos_to_final_ms_max"] = round(self.eos_to_final_ms.max, 1)
            out["final_compute_ms_p50"] = round(self.final_compute_ms.percentile(50), 1)
            out["final_compute_ms_max"] = round(self.final_compute_ms.max, 1)
        out.update(extra)
        return out


def graph_summary(sessions: dict[str, Any]) -> dict[str, Any]:
    """Per graph: the provider it really runs on and its run times per run size (e.g. tokens 1
    and K), from the sessions' bounded histograms. Shared by every stream of one model."""
    out: dict[str, Any] = {}
    for name, session in sessions.items():
        sizes = {}
        for size, h in sorted(dict(session.times.by_size).items()):
            sizes[str(size)] = {"runs": h.n, "ms_p50": round(h.percentile(50), 3),
                                "ms_p95": round(h.percentile(95), 3), "ms_max": round(h.max, 3)}
        out[name] = {"provider": session.provider, "sizes": sizes}
    return out
