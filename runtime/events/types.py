"""Typed events the runtime emits; sinks turn them into JSON lines or a live caption line.

`t` is seconds of audio since the stream started (so a file and a microphone read the same way);
`line` identifies a caption line: partials of a line are replaced by its one final, which never
changes afterwards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Union


@dataclass(frozen=True)
class Ready:
    bundle: str
    family: str
    pipeline: str
    provider: str
    sample_rate: int
    input: str
    t: float = 0.0
    type: str = "ready"


@dataclass(frozen=True)
class SpeechStarted:
    """Emitted when the VAD is sure (`t`); `start` is where the speech began, a little earlier."""

    line: int
    t: float
    start: float
    type: str = "speech_started"


@dataclass(frozen=True)
class Partial:
    """The current line: `confirmed` is the stable prefix (agreed by the policy), `text` adds the
    still tentative tail."""

    line: int
    t: float
    text: str
    confirmed: str
    type: str = "partial"


@dataclass(frozen=True)
class Final:
    """A finished line; every line ends with exactly one. `reason`: endpoint, segment (Whisper
    closed it mid-speech), window (the model's window or memory was full), gap (input was lost
    after it), end_of_input, shutdown, mic_lost (the capture device went away), or retracted
    (words were shown, the final has none)."""

    line: int
    t: float
    text: str
    reason: str
    start: float = 0.0
    end: float = 0.0
    type: str = "final"


@dataclass(frozen=True)
class Stats:
    t: float
    values: dict[str, Any] = field(default_factory=dict)
    type: str = "stats"


@dataclass(frozen=True)
class ErrorEvent:
    t: float
    message: str
    fatal: bool = False
    type: str = "error"


@dataclass(frozen=True)
class Gap:
    """`duration` seconds of input were lost (the backlog dropped its oldest audio, or the
    device delivered nothing); `t` is where the hole begins. No line spans it."""

    t: float
    duration: float
    type: str = "gap"


@dataclass(frozen=True)
class Notice:
    """Something the operator should know that is not an error: mic lost/restored, falling behind."""

    t: float
    kind: str
    message: str
    type: str = "notice"


@dataclass(frozen=True)
class Reply:
    """The responder's reply so far (`text` grows token by token); `reply` numbers the replies
    of a stream."""

    reply: int
    t: float
    text: str
    type: str = "reply"


@dataclass(frozen=True)
class ReplyEnd:
    """A reply is complete. `reason`: stop (the model ended it), limit (--max-reply-tokens),
    barge_in (the person spoke; the text so far stays in the conversation), end_of_input."""

    reply: int
    t: float
    text: str
    reason: str
    type: str = "reply_end"


Event = Union[Ready, SpeechStarted, Partial, Final, Stats, ErrorEvent, Notice,
              Gap, Reply, ReplyEnd]


def to_json(event: Event) -> str:
    data = asdict(event)
    if isinstance(event, Stats):
        data = {"type": "stats", "t": event.t, **event.values}
    for key in ("t", "start", "end", "duration"):
        if key in data:
            data[key] = round(data[key], 3)
    return json.dumps(data, ensure_ascii=False)
