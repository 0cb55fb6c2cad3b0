"""Where events go: JSON lines for programs, a live caption line for people."""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

from edgestream.runtime.events.types import ErrorEvent, Event, Final, Notice, Partial, Ready, Stats, to_json


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...


class JsonlSink:
    """One JSON object per line, flushed at once so a reader sees partials as they happen."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def emit(self, event: Event) -> None:
        self.stream.write(to_json(event) + "\n")
        self.stream.flush()


class CaptionSink:
    """A caption line rewritten in place while it is partial (on a terminal), then fixed when
    final. Stats and notices go to stderr so stdout stays the transcript."""

    def __init__(self, stream: TextIO | None = None, err: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.err = err or sys.stderr
        self.live = self.stream.isatty()
        self._shown = 0

    def _clear(self) -> None:
        if self.live and self._shown:
            self.stream.write("\r\033[K")
            self._shown = 0

    def emit(self, event: Event) -> None:
        if isinstance(event, Partial) and self.live:
            self._clear()
            text = event.text[-200:]
            self.stream.write(text)
            self._shown = len(text)
        elif isinstance(event, Final):
            self._clear()
            self.stream.write(event.text + "\n")
        elif isinstance(event, Stats):
            self._clear()
            v = event.values
            self.err.write(
                f"[stats] {v['audio_s']:.1f} s audio, {v['chunks']} chunks, RTF {v['rtf']:.3f}, "
                f"step p50/p95/p99 {v['step_ms_p50']}/{v['step_ms_p95']}/{v['step_ms_p99']} ms"
                + (f", end of speech -> final {v['eos_to_final_ms_p50']} ms"
                   if "eos_to_final_ms_p50" in v else "")
                + f", mic overruns {v['mic_overruns']}\n")
        elif isinstance(event, (ErrorEvent, Notice)):
            self._clear()
            self.err.write(f"[{event.type}] {event.message}\n")
        elif isinstance(event, Ready):
            self.err.write(f"[ready] {event.family} bundle on {event.provider}, "
                           f"input {event.input}\n")
        self.stream.flush()
