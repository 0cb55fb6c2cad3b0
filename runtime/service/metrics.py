"""/healthz and /metrics, read from the loop's status without stopping it.

Prometheus text exposition format 0.0.4: counters end in `_total`, times are in seconds,
histograms are cumulative `le` buckets (exact: the stats histograms count at these bounds).
"""

from __future__ import annotations

import time
from typing import Any

from edgestream.runtime.events.sinks import SinkSet
from edgestream.runtime.events.stats import Histogram
from edgestream.runtime.loop import LoopStatus
from edgestream.runtime.service.hub import EventHub


def health(status: LoopStatus, ready: bool) -> dict[str, Any]:
    counters = status.source.counters() if status.source is not None else {}
    return {
        "ready": ready and status.running,
        "last_chunk_age_s": round(time.monotonic() - status.last_block_at, 3),
        "lag_s": round(max(0.0, status.lag_s), 3),
        "overruns": int(counters.get("input_overflows", 0)),
        "dropped_blocks": int(counters.get("dropped_blocks", 0)),
        "mic": "up" if status.mic_up else "lost",
    }


def _histogram(name: str, help_text: str, h: Histogram) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    counts = h.coarse.copy()  # a copy: the loop keeps counting while we read
    running = 0
    for bound, count in zip(h.BOUNDS_MS, counts):
        running += int(count)
        lines.append(f'{name}_bucket{{le="{bound / 1000:g}"}} {running}')
    total = running + int(counts[-1])
    lines += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_sum {h.total / 1000:.6f}",
              f"{name}_count {total}"]
    return lines


def render(status: LoopStatus, hub: EventHub | None, sinks: SinkSet | None, ready: bool) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float) -> None:
        out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value:g}"])

    stream = status.stream
    counters = status.source.counters() if status.source is not None else {}
    metric("edgestream_ready", "gauge", "1 once the bundle is loaded and warmed up", int(ready))
    metric("edgestream_mic_up", "gauge", "1 while the capture device delivers audio",
           int(status.mic_up))
    metric("edgestream_mic_losses_total", "counter", "times the capture device was lost",
           status.mic_losses)
    metric("edgestream_input_overruns_total", "counter", "PortAudio input overflows",
           counters.get("input_overflows", 0))
    metric("edgestream_dropped_blocks_total", "counter",
           "capture blocks dropped because the loop fell behind", counters.get("dropped_blocks", 0))
    metric("edgestream_lag_seconds", "gauge", "how far the loop trails the live input",
           max(0.0, status.lag_s))
    metric("edgestream_last_chunk_age_seconds", "gauge", "time since the loop handled a block",
           time.monotonic() - status.last_block_at)
    if stream is not None:
        s = stream.stats
        audio_s = s.audio_samples / s.rate
        metric("edgestream_chunks_total", "counter", "model chunks processed", s.chunks)
        metric("edgestream_audio_seconds_total", "counter", "audio processed", audio_s)
        metric("edgestream_compute_seconds_total", "counter", "compute spent on the audio",
               s.compute_ms / 1000)
        metric("edgestream_rtf", "gauge", "compute time over audio time since start",
               s.compute_ms / 1000 / audio_s if audio_s else 0.0)
        metric("edgestream_gaps_total", "counter", "holes in the input (dropped or lost audio)",
               stream.gate.counters.gaps)
        metric("edgestream_lines_total", "counter", "caption lines finalized", stream.gate.line)
        out += _histogram("edgestream_step_seconds", "compute per model chunk", s.step_ms)
        out += _histogram("edgestream_eos_to_final_seconds",
                          "end of speech to final caption (silence waited plus compute)",
                          s.eos_to_final_ms)
    if sinks is not None:
        metric("edgestream_events_dropped_total", "counter",
               "events a slow sink could not take", sinks.dropped)
    if hub is not None:
        metric("edgestream_page_clients", "gauge", "connected event streams", hub.clients)
        metric("edgestream_page_clients_dropped_total", "counter",
               "event streams dropped for reading too slowly", hub.dropped_clients)
        metric("edgestream_page_clients_refused_total", "counter",
               "event streams refused (too many)", hub.refused_clients)
    return "\n".join(out) + "\n"
