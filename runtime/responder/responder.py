"""The responder: a second engine beside the recognizer.

    model = edgestream.runtime.load("bundles/whisper-tiny.en")
    lm = edgestream.runtime.responder.load_lm("bundles/smollm2")
    responder = Responder(model, lm, ResponderOptions(system_prompt="..."))
    for event in responder.feed(samples, rate): ...        # captions and reply events

While the person speaks, the stable text (finals, and the confirmed words of the open line) is
prefilled as it arrives; a revision rolls the LM back to the common prefix. At a short pause
(`pause_ms`, the recognizer's speculative final) the reply starts unseen; if the person goes on
it is discarded and the LM rolled back, if the endpoint confirms it is shown at once and goes on.
Speech during a reply stops it (barge-in); its text so far stays in the conversation.

The LM runs on a worker thread at a lower scheduling priority (the recognizer comes first on a
small CPU); `threaded=False` runs it inline instead (deterministic: tests, benchmarks).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgestream.runtime.errors import OptionError
from edgestream.runtime.events.types import Event, Final, Partial, Reply, ReplyEnd, SpeechStarted
from edgestream.runtime.responder.conversation import DEFAULT_SYSTEM, Conversation
from edgestream.runtime.responder.lm import LanguageModel

log = logging.getLogger(__name__)

TURN_ENDS = ("endpoint", "end_of_input")  # finals after which the person expects an answer


@dataclass(frozen=True)
class ResponderOptions:
    """`pause_ms`: silence after which the reply starts speculatively (the recognizer's
    speculative final; well before its endpoint); `threaded`: LM work on a worker thread."""

    system_prompt: str = DEFAULT_SYSTEM
    max_reply_tokens: int = 64
    pause_ms: int = 200
    speculative: bool = True
    threaded: bool = True
    # bytes of recurrent-state snapshots kept for rollback (hybrid models: qwen3_5 and the like,
    # ~60 MB each at real size); None: 256 MB. Fewer snapshots only mean a longer re-read
    # after a rollback (from the nearest kept one, or from the start), never other tokens.
    snapshot_bytes: int | None = None


class _Worker:
    """Runs LM commands in order (inline, or on its own low-priority thread) and generates the
    current reply between commands."""

    def __init__(self, conv: Conversation, threaded: bool, now: Any) -> None:
        self.conv = conv
        self.now = now  # -> seconds of audio (the event clock)
        self.events: queue.Queue[Event] = queue.Queue()
        self.commands: queue.Queue[tuple] = queue.Queue()
        self.reply_id = -1
        self.shown = False  # the current reply is visible (not speculative)
        self.first_token_at: dict[int, float] = {}  # reply id -> its first token shown
        self.error: BaseException | None = None
        self._idle = threading.Event()
        self._idle.set()
        self.thread: threading.Thread | None = None
        if threaded:
            self.thread = threading.Thread(target=self._loop, name="responder", daemon=True)
            self.thread.start()

    # -- called from the audio side ---------------------------------------------------------
    def post(self, *command: Any) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:
            self._run(command)
            if command[0] in ("answer", "commit", "speculate"):
                while self._generate():
                    pass
        else:
            self.commands.put(command)

    def take(self) -> list[Event]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def drain(self) -> None:
        """Wait until every command is done and a shown reply has ended."""
        if self.thread is not None and self.thread.is_alive():
            self._idle.clear()
            self.commands.put(("sync",))
            self._idle.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.thread is not None:
            self.commands.put(("quit",))
            self.thread.join(timeout=10)

    # -- the LM side ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:  # Linux: a thread's nice value is its own; the recognizer keeps priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (OSError, AttributeError):
            pass
        waiting = False
        try:
            while True:
                reply = self.conv.reply
                generating = reply is not None and not reply.ended
                if waiting and self.commands.empty() and not (generating and self.shown):
                    waiting = False
                    self._idle.set()
                try:
                    command = self.commands.get(block=not generating)
                except queue.Empty:
                    self._generate()  # between commands: the reply goes on
                    continue
                if command[0] == "quit":
                    return
                if command[0] == "sync":
                    waiting = True
                    continue
                self._run(command)
        except BaseException as e:  # surfaced to the audio side on its next call
            log.exception("responder failed")
            self.error = e
        finally:
            self._idle.set()

    def _run(self, command: tuple) -> None:
        kind = command[0]
        if kind == "read":
            self.conv.read(command[1])
        elif kind == "speculate":
            self.conv.begin_reply(command[1])
            self.reply_id += 1
            self.shown = False
        elif kind == "discard":
            self.conv.discard()
            self.shown = False
            self.reply_id -= 1  # the number is reused: that reply was never seen
        elif kind == "commit":
            self.shown = True
            if self.conv.reply is not None and self.conv.reply.tokens:
                self._show()
            if self.conv.reply is not None and self.conv.reply.ended:
                self._end(self.conv.reply.ended)
        elif kind == "answer":
            self.reply_id += 1
            self.conv.begin_reply(command[1])
            self.shown = True
        elif kind == "barge_in":
            if self.conv.reply is not None and self.shown:
                self._end("barge_in")
        elif kind == "end":
            if self.conv.reply is not None:
                if self.shown:
                    self._end(self.conv.reply.ended or command[1])
                else:
                    self.conv.discard()

    def _generate(self) -> bool:
        """One reply token; False when there is nothing to generate."""
        reply = self.conv.reply
        if reply is None or reply.ended:
            if reply is not None and self.shown:
                self._end(reply.ended)
            return False
        token = self.conv.next_token()
        if self.shown and token is not None:
            self._show()
        if self.shown and reply.ended:
            self._end(reply.ended)
            return False
        # speculative: generate ahead up to the limit, unseen
        return not reply.ended

    def _show(self) -> None:
        self.first_token_at.setdefault(self.reply_id, time.perf_counter())
        self.events.put(Reply(self.reply_id, self.now(), self.conv.text()))

    def _end(self, reason: str) -> None:
        self.events.put(ReplyEnd(self.reply_id, self.now(), self.conv.text(), reason))
        self.conv.close()
        self.shown = False


class Responder:
    """A recognizer stream with a responder beside it; behaves like the stream it wraps
    (feed, gap, end_line, finish, stats_event) and adds `reply` / `reply_end` events."""

    def __init__(self, model: Any, lm: LanguageModel, options: ResponderOptions | None = None,
                 **stream_options: Any) -> None:
        o = options or ResponderOptions()
        if not isinstance(o.pause_ms, int) or o.pause_ms < 0:
            raise OptionError(f"pause_ms={o.pause_ms!r}: give a whole number of milliseconds")
        self.options = o
        self.lm = lm
        if "speculate_ms" not in stream_options:
            stream_options["speculate_ms"] = o.pause_ms
        self.stream = model.stream(**stream_options)
        self.conv = Conversation(lm, o.system_prompt, o.max_reply_tokens, o.snapshot_bytes)
        self.worker = _Worker(self.conv, o.threaded, lambda: self.stream.gate.now)
        self._finals: list[str] = []  # lines of the current turn closed mid-speech
        self._confirmed = ""
        self._read = ""  # the text last handed to the LM
        self._speculated: str | None = None
        self.endpoint_at: dict[int, float] = {}  # reply id -> when its endpoint was seen
        self._replies = 0

    # the stream's interface, for the loop and the service
    @property
    def gate(self) -> Any:
        return self.stream.gate

    @property
    def model(self) -> Any:
        return self.stream.model

    @property
    def behind(self) -> bool:
        return self.stream.behind

    @behind.setter
    def behind(self, value: bool) -> None:
        self.stream.behind = value

    @property
    def state_bytes(self) -> int:
        return self.stream.state_bytes + self.conv.state_bytes

    def stats_event(self, **extra: Any) -> Any:
        lat = self.first_reply_ms()
        if lat:
            extra["reply_first_ms_p50"] = round(float(np.median(lat)), 2)
        return self.stream.stats_event(**extra)

    def feed(self, samples: np.ndarray, sample_rate: int) -> list[Event]:
        return self._react(self.stream.feed(samples, sample_rate))

    def gap(self, seconds: float) -> list[Event]:
        return self._react(self.stream.gap(seconds))

    def end_line(self, reason: str) -> list[Event]:
        return self._react(self.stream.end_line(reason))

    def finish(self, reason: str = "end_of_input") -> list[Event]:
        """End of input: the last line is finalized and answered; waits for the reply."""
        events = self._react(self.stream.finish(reason))
        self.worker.drain()
        events += self.worker.take()
        self.worker.stop()
        return events

    def first_reply_ms(self) -> list[float]:
        """Per shown reply: time from the endpoint decision to its first token shown (ms)."""
        w = self.worker
        out = []
        for rid, seen in self.endpoint_at.items():
            first = w.first_token_at.get(rid)
            if first is not None:
                out.append(max(0.0, first - seen) * 1000.0)
        return out

    # -- turn logic ---------------------------------------------------------------------------
    def _turn_text(self, open_line: str) -> str:
        return " ".join(t for t in [*self._finals, open_line] if t.strip()).strip()

    def _react(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for e in events:
            out.append(e)
            if isinstance(e, SpeechStarted):
                self.worker.post("barge_in")
            elif isinstance(e, Partial):
                self._confirmed = e.confirmed
                self._read_along(self._turn_text(e.confirmed))
            elif isinstance(e, Final):
                self._confirmed = ""
                if e.reason in TURN_ENDS:
                    self._answer(self._turn_text(e.text))
                elif e.text and e.reason != "retracted":
                    self._finals.append(e.text)
                    self._read_along(self._turn_text(""))
        if self.options.speculative:
            spec = self.stream.gate.speculative_text
            if spec is not None and self._speculated is None:
                text = self._turn_text(spec)
                if text:
                    self._speculated = text
                    self.worker.post("speculate", text)
            elif spec is None and self._speculated is not None:
                self.worker.post("discard")  # the person went on before the endpoint
                self._speculated = None
        return out + self.worker.take()

    def _read_along(self, text: str) -> None:
        if text and text != self._read and self._speculated is None:
            self._read = text
            self.worker.post("read", text)

    def _answer(self, text: str) -> None:
        spec, self._speculated = self._speculated, None
        self._finals, self._read = [], ""
        now = time.perf_counter()
        if spec is not None and spec == text:
            self.endpoint_at[self._replies] = now
            self._replies += 1
            self.worker.post("commit")
            return
        if spec is not None:
            self.worker.post("discard")
        if not text:
            return
        self.endpoint_at[self._replies] = now
        self._replies += 1
        self.worker.post("answer", text)
