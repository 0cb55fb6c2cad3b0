"""Streaming statistics: per-chunk compute latency percentiles, real-time factor, final latency."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from edgestream.runtime.events.types import Event
from edgestream.runtime.vad import VadEvent


def finalize_at_endpoint(finalize: Callable[..., list[Event]], vad: VadEvent, rate: int,
                         latencies_ms: list[float], compute_ms: list[float]) -> list[Event]:
    """Finalize a line at a VAD endpoint, cutting in the middle of the pause (audio after it may
    hold the next utterance), and record end of speech -> final: the trailing silence waited
    plus the compute spent."""
    started = time.perf_counter()
    events = finalize("endpoint", upto=(vad.sample + vad.decided) // 2, t=vad.decided / rate)
    compute = (time.perf_counter() - started) * 1000.0
    compute_ms.append(compute)
    latencies_ms.append((vad.decided - vad.sample) * 1000.0 / rate + compute)
    return events


class StreamStats:
    """Accumulates what one stream cost; `summary()` is the stats event's payload."""

    def __init__(self, sample_rate: int) -> None:
        self.rate = sample_rate
        self.chunks = 0
        self.audio_samples = 0
        self.step_ms: list[float] = []

    def record(self, samples: int, compute_ms: float) -> None:
        self.chunks += 1
        self.audio_samples += samples
        self.step_ms.append(compute_ms)

    def summary(self, final_latencies_ms: list[float], counters: dict[str, int],
                final_compute_ms: list[float] | None = None) -> dict:
        audio_s = self.audio_samples / self.rate
        steps = np.array(self.step_ms) if self.step_ms else np.zeros(1)
        out = {
            "chunks": self.chunks,
            "audio_s": round(audio_s, 3),
            "compute_s": round(float(steps.sum()) / 1000.0, 3),
            "rtf": round(float(steps.sum()) / 1000.0 / audio_s, 4) if audio_s else 0.0,
            "step_ms_p50": round(float(np.percentile(steps, 50)), 2),
            "step_ms_p95": round(float(np.percentile(steps, 95)), 2),
            "step_ms_p99": round(float(np.percentile(steps, 99)), 2),
            "step_ms_max": round(float(steps.max()), 2),
            "mic_overruns": int(counters.get("input_overflows", 0)),
            "dropped_blocks": int(counters.get("dropped_blocks", 0)),
        }
        if final_latencies_ms:
            out["eos_to_final_ms_p50"] = round(float(np.percentile(final_latencies_ms, 50)), 1)
            out["eos_to_final_ms_max"] = round(float(max(final_latencies_ms)), 1)
        if final_compute_ms:
            out["final_compute_ms_p50"] = round(float(np.percentile(final_compute_ms, 50)), 1)
            out["final_compute_ms_max"] = round(float(max(final_compute_ms)), 1)
        return out
