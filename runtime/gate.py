"""The stream gate, written once for every family: VAD gating, pre-roll, endpoint, line ids,
window splits, gaps, latency bookkeeping and the speculative final.

A family contributes only a `Policy` (how it turns a line's audio into hypotheses). The gate
hands the policy every sample in order and says when a line begins; it asks for partials at a
cadence that adapts to compute, and for the final when the line ends.

Speculative final: once the VAD has heard `speculate_ms` of silence after speech, the gate holds
back further audio from the policy (the line's audio ends there: `cut`), snapshots the policy,
and decodes the final at once. When the endpoint confirms the silence, that final is shown
immediately; when speech resumes first, the snapshot is restored, the held audio is handed over,
and nothing was shown. The hold-back happens whether or not speculation is on, so a speculative
final is exactly the final the normal path would give: the same audio, the same policy state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgestream.runtime.events.stats import StreamStats
from edgestream.runtime.events.types import Event, Final, Gap, Partial, SpeechStarted
from edgestream.runtime.vad import Endpointer


@dataclass(frozen=True)
class LineText:
    """A finished line as the policy decoded it."""

    text: str
    start: int  # stream samples
    end: int


@dataclass(frozen=True)
class Hypothesis:
    """A partial decode: lines the policy closed on its own (Whisper's timestamped segments),
    then the open line's text and its confirmed prefix."""

    closed: tuple[LineText, ...] = ()
    text: str = ""
    confirmed: str = ""


class Policy(Protocol):
    """What a family contributes to the gate."""

    def push(self, audio: np.ndarray) -> None:
        """The next samples of the stream, contiguous with the previous ones."""

    def begin(self, start: int) -> None:
        """A line begins at stream sample `start` (already pushed: the pre-roll)."""

    def partial(self) -> Hypothesis: ...

    def final(self) -> LineText:
        """Decode the open line over everything pushed as final; the policy closes the line and
        keeps what it wants as context for the next one."""

    def full(self) -> bool:
        """The open line cannot take more audio (window or memory limit): finalize it now."""

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...

    def forget(self, resume_at: int) -> None:
        """A gap: nothing before it may be used as context; audio resumes at `resume_at`."""


@dataclass(frozen=True)
class GateConfig:
    """`cadence_ms`: partial decode cadence; `speculate_ms`: silence after speech at which the
    line is cut and its final decoded (at most `endpoint_ms`, which confirms it);
    `adaptive`: live input, decode partials less often when compute falls behind."""

    cadence_ms: int = 500
    speculate_ms: int = 160
    speculative: bool = True
    adaptive: bool = False
    endpoint_ms: int = 640


@dataclass
class _Speculation:
    last_speech_end: int
    line: LineText
    snapshot: Any
    compute_ms: float


@dataclass
class GateCounters:
    speculative_used: int = 0
    speculative_discarded: int = 0
    gaps: int = 0
    gap_s: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)


class Gate:
    """Feed model-rate mono chunks; get the events they cause."""

    def __init__(self, policy: Policy, endpointer: Endpointer, rate: int,
                 config: GateConfig, stats: StreamStats) -> None:
        self.policy = policy
        self.endpointer = endpointer
        self.rate = rate
        self.config = config
        self.stats = stats
        self.counters = GateCounters()
        self.clock = 0  # stream samples seen (gaps included)
        self.line = 0
        self.active = False
        self.shown = False  # a partial with words was shown for the open line
        self.behind = False  # the loop says the source is backlogged: no partials
        self._held = np.zeros(0, dtype=np.float32)  # audio after the cut, not yet pushed
        self._held_start = 0
        self._pushed = 0  # stream sample up to which the policy has audio
        self._since_partial = 0
        self._cadence = config.cadence_ms * rate // 1000
        self._speculation: _Speculation | None = None
        self._last_partial = ""
        self._spec_tail = min(config.speculate_ms, config.endpoint_ms) * rate // 1000

    @property
    def now(self) -> float:
        return self.clock / self.rate

    @property
    def speculative_text(self) -> str | None:
        """The open line's final, decoded ahead of the endpoint during the pause; None when no
        speculation is pending (a responder starts its reply from it)."""
        return self._speculation.line.text if self._speculation is not None else None

    # -- input -------------------------------------------------------------------------------

    def feed(self, chunk: np.ndarray) -> list[Event]:
        events: list[Event] = []
        self.clock += chunk.size
        vad_events = self.endpointer.process(chunk)
        # invariant: _held_start + _held.size == clock (what is not pushed yet is held)
        self._held = np.concatenate([self._held, chunk]) if self._held.size else chunk
        for vad in vad_events:
            if vad.kind == "start" and not self.active:
                self._release(vad.decided)  # the pre-roll and the speech so far
                self.policy.begin(vad.sample)
                self.active = True
                self.shown = False
                self._since_partial = 0
                events.append(SpeechStarted(self.line, vad.decided / self.rate,
                                            vad.sample / self.rate))
            elif vad.kind == "end" and self.active:
                events += self._endpoint(vad.sample, vad.decided)
        if not self.active:
            self._release(self.clock)
            return events
        silence_from = self.endpointer.last_speech_end
        silent = not self.endpointer.speech_now
        cut = silence_from + self._spec_tail
        if silent and self.endpointer.position >= cut:
            self._release(cut)
            if self.config.speculative and self._speculation is None:
                self._speculate(silence_from)
            return events
        if self._speculation is not None:  # speech resumed before the endpoint
            self.policy.restore(self._speculation.snapshot)
            self._speculation = None
            self.counters.speculative_discarded += 1
        before = self._pushed
        self._release(self.clock)
        self._since_partial += self._pushed - before
        if self.policy.full():
            events += self._close("window", self.now)
            self.active = True  # the speech goes on in a new line
            self.policy.begin(self._pushed)
            return events
        if self._since_partial >= self._cadence and not self.behind:
            events += self._partial()
        return events

    def finish(self, reason: str = "end_of_input") -> list[Event]:
        """End of input (or shutdown): finalize the open line."""
        if not self.active:
            return []
        spec = self._speculation
        if spec is not None and spec.last_speech_end == self.endpointer.last_speech_end:
            return self._emit_final(spec.line, reason, self.now)
        if spec is not None:
            self.policy.restore(spec.snapshot)
            self._speculation = None
        self._release(self.clock if self.endpointer.speech_now else
                      min(self.clock, self.endpointer.last_speech_end + self._spec_tail))
        return self._close(reason, self.now)

    def gap(self, samples: int) -> list[Event]:
        """`samples` of input were lost: close the line before them; nothing spans the hole."""
        events = self.finish("gap") if self.active else []
        self._held = np.zeros(0, dtype=np.float32)
        self.policy.forget(self.clock + samples)
        self.endpointer.skip(samples)
        self.counters.gaps += 1
        self.counters.gap_s += samples / self.rate
        events.append(Gap(self.now, samples / self.rate))
        self.clock += samples
        self._pushed = self._held_start = self.clock
        return events

    # -- internals ---------------------------------------------------------------------------

    def _release(self, upto: int) -> None:
        """Hand the held audio up to stream sample `upto` to the policy."""
        n = max(0, min(upto, self._held_start + self._held.size) - self._held_start)
        if n:
            self.policy.push(self._held[:n])
            self._held = self._held[n:]
            self._held_start += n
            self._pushed = self._held_start

    def _speculate(self, last_speech_end: int) -> None:
        started = time.perf_counter()
        snapshot = self.policy.snapshot()
        line = self.policy.final()
        self._speculation = _Speculation(last_speech_end, line, snapshot,
                                         (time.perf_counter() - started) * 1000.0)

    def _partial(self) -> list[Event]:
        self._since_partial = 0
        started = time.perf_counter()
        hyp = self.policy.partial()
        spent = time.perf_counter() - started
        if self.config.adaptive:
            # a decode slower than the cadence makes the next one wait longer: captions get
            # rarer, never later
            self._cadence = max(self.config.cadence_ms * self.rate // 1000,
                                int(spent * 1.25 * self.rate))
        events: list[Event] = []
        for closed in hyp.closed:
            events += self._emit_final(closed, "segment", self.now, keep_active=True)
        if hyp.text and hyp.text != self._last_partial:
            events.append(Partial(self.line, self.now, hyp.text, hyp.confirmed))
            self._last_partial = hyp.text
            self.shown = True
        return events

    def _endpoint(self, speech_end: int, decided: int) -> list[Event]:
        t = decided / self.rate
        spec = self._speculation
        started = time.perf_counter()
        if spec is not None and spec.last_speech_end == speech_end:
            self.counters.speculative_used += 1
            events = self._emit_final(spec.line, "endpoint", t)
        else:
            if spec is not None:
                self.policy.restore(spec.snapshot)
                self._speculation = None
            self._release(min(self.clock, speech_end + self._spec_tail))
            events = self._close("endpoint", t)
        compute = (time.perf_counter() - started) * 1000.0
        self.stats.record_final((decided - speech_end) * 1000.0 / self.rate + compute, compute)
        return events

    def _close(self, reason: str, t: float) -> list[Event]:
        return self._emit_final(self.policy.final(), reason, t)

    def _emit_final(self, line: LineText, reason: str, t: float,
                    keep_active: bool = False) -> list[Event]:
        self._speculation = None
        if not line.text and self.shown:
            reason = "retracted"  # words were shown and the final has none: say so
        event = Final(self.line, t, line.text, reason, line.start / self.rate,
                      line.end / self.rate)
        self.line += 1
        self.shown = False
        self._last_partial = ""
        self.active = keep_active
        if not keep_active:
            self._release(self.clock)  # the audio after the cut is the next line's pre-roll
        return [event]
