"""Where events go: JSON lines for programs, a live caption line for people; `SinkSet` puts a
bounded queue and a writer thread between them and the audio loop, which never waits."""

from __future__ import annotations

import logging
import queue
import sys
import threading
from typing import Iterable, Protocol, TextIO

from edgestream.runtime.events.types import (ErrorEvent, Event, Final, Gap, Notice, Partial,
                                              Ready, ReplyEnd, Stats, to_json)

log = logging.getLogger(__name__)


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...


class SinkClosed(Exception):
    """The sink's reader went away (a closed pipe): the run ends cleanly."""


class JsonlSink:
    """One JSON object per line, flushed at once so a reader sees partials as they happen."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def emit(self, event: Event) -> None:
        try:
            self.stream.write(to_json(event) + "\n")
            self.stream.flush()
        except BrokenPipeError as e:
            raise SinkClosed(str(e)) from e


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
        try:
            self._emit(event)
        except BrokenPipeError as e:
            raise SinkClosed(str(e)) from e

    def _emit(self, event: Event) -> None:
        if isinstance(event, Partial) and self.live:
            self._clear()
            text = event.text[-200:]
            self.stream.write(text)
            self._shown = len(text)
        elif isinstance(event, Final):
            self._clear()
            if event.text:
                self.stream.write(event.text + "\n")
        elif isinstance(event, Stats):
            self._clear()
            v = event.values
            self.err.write(
                f"[stats] {v['audio_s']:.1f} s audio, {v['chunks']} chunks, RTF {v['rtf']:.3f}, "
                f"step p50/p95/p99 {v['step_ms_p50']}/{v['step_ms_p95']}/{v['step_ms_p99']} ms"
                + (f", end of speech -> final {v['eos_to_final_ms_p50']} ms"
                   if "eos_to_final_ms_p50" in v else "")
                + f", mic overruns {v.get('mic_overruns', 0)}\n")
        elif isinstance(event, (ErrorEvent, Notice)):
            self._clear()
            self.err.write(f"[{event.type}] {event.message}\n")
        elif isinstance(event, ReplyEnd):
            self._clear()
            self.stream.write(f"> {event.text}\n")
        elif isinstance(event, Gap):
            self._clear()
            self.err.write(f"[gap] {event.duration:.2f} s of audio lost at {event.t:.2f} s\n")
        elif isinstance(event, Ready):
            self.err.write(f"[ready] {event.family} bundle on {event.provider}, "
                           f"input {event.input}\n")
        self.stream.flush()


class SinkSet:
    """Delivers events to sinks from a writer thread. The queue holds `capacity` events; when
    a reader is too slow, partials are dropped first, and the drops are counted."""

    def __init__(self, sinks: Iterable[Sink], capacity: int = 1000) -> None:
        self.sinks = list(sinks)
        self._queue: queue.Queue[Event | None] = queue.Queue(maxsize=capacity)
        self.dropped = 0
        self.closed = False  # a sink's reader went away
        self._thread = threading.Thread(target=self._write, name="edgestream-sinks", daemon=True)
        self._thread.start()

    def emit(self, events: Iterable[Event]) -> None:
        for event in events:
            if self.closed:
                return
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                if isinstance(event, Partial):
                    self.dropped += 1
                    continue
                try:  # a final, stats or notice must get through: wait a moment for room
                    self._queue.put(event, timeout=0.5)
                except queue.Full:
                    self.dropped += 1
                    log.warning("event sink is stuck; dropped a %s event", event.type)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (waiting at most `timeout`), then stop the writer."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _write(self) -> None:
        while (event := self._queue.get()) is not None:
            if self.closed:
                continue
            for sink in self.sinks:
                try:
                    sink.emit(event)
                except SinkClosed:
                    self.closed = True
                    log.info("the event reader closed its end; stopping")
                    break
