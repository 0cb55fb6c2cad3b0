"""One conversation with the LM: the system prompt pinned as the ring's sink tokens, each turn
read along as it is spoken, replies generated token by token, speculation rolled back.

Token stream: encode(system_prefix + SYSTEM + after_system) [pinned], then per turn
encode(USER + after_user) read incrementally, the reply tokens, encode(after_assistant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgestream.runtime.errors import OptionError
from edgestream.runtime.responder.engine import LMEngine
from edgestream.runtime.responder.lm import LanguageModel
from edgestream.runtime.responder.prefill import IncrementalPrefill

DEFAULT_SYSTEM = "You are a friendly voice assistant. Answer in one or two short sentences."


@dataclass
class ReplyState:
    """A reply being generated: `mark` is where it can be rolled back to (before the turn's
    closing tokens), `logits` the next choice's, `pending` a chosen token not yet fed."""

    mark: int
    logits: np.ndarray
    tokens: list[int] = field(default_factory=list)
    ended: str = ""  # stop, limit (or set by the caller: barge_in, end_of_input)
    pending: int | None = None


class Conversation:
    """The LM side of a responder; used from one thread at a time."""

    def __init__(self, lm: LanguageModel, system_prompt: str, max_reply_tokens: int,
                 snapshot_bytes: int | None = None) -> None:
        if not isinstance(max_reply_tokens, int) or max_reply_tokens < 1:
            raise OptionError(f"max_reply_tokens={max_reply_tokens!r}: give a whole number >= 1")
        self.lm = lm
        self.chat = lm.spec.chat
        self.max_reply = max_reply_tokens
        self.system_ids = lm.encode(self.chat["system_prefix"] + system_prompt +
                                    self.chat["after_system"])
        self._suffix = lm.encode(self.chat["after_user"])
        self._close = lm.encode(self.chat["after_assistant"])
        k = lm.spec.chunk_tokens
        # rows a rollback may have to recover: a speculative reply and the turn's last chunks
        margin = max_reply_tokens + len(self._suffix) + 2 * k
        room = lm.spec.kv_slots - margin - 4 * k
        if len(self.system_ids) > room:
            raise OptionError(
                f"system prompt is {len(self.system_ids)} tokens, but {lm.root} keeps "
                f"{lm.spec.kv_slots} KV slots and a reply margin of {margin}: at most {room} "
                "tokens can be pinned. Shorten --system-prompt, lower --max-reply-tokens, or "
                "export the LM with more --kv-slots")
        self.engine = LMEngine(lm, pinned=len(self.system_ids), margin=margin,
                               snapshot_bytes=snapshot_bytes)
        self.reply: ReplyState | None = None
        self.inexact_rollbacks = 0
        self._start()

    def _start(self) -> None:
        self.engine.reset()
        self.engine.feed(self.system_ids)
        self.reader = IncrementalPrefill(self.engine, "")

    @property
    def state_bytes(self) -> int:
        return self.engine.state_bytes

    def read(self, text: str) -> None:
        """The stable text of the turn so far (finals and confirmed words)."""
        if self.reply is None and text:
            self.reader.update(text)
            # room for the reply now, while the person talks, not during its steps
            self.engine.reserve(self.max_reply + len(self._suffix) + len(self._close))

    def begin_reply(self, text: str) -> None:
        """The turn's text is complete (or assumed so: speculation): close it, start a reply."""
        room = self.lm.spec.max_position - self.engine.position
        if room < 4 * (self.max_reply + len(self._suffix) + len(self._close)):
            self._start()  # RoPE positions are running out: a new conversation, same system
        mark = self.engine.position
        logits = self.reader.finish(text, self.chat["after_user"])
        self.reply = ReplyState(mark, logits)

    def next_token(self) -> int | None:
        """Choose (and feed) the next reply token; None when the reply has ended."""
        r = self.reply
        if r is None or r.ended:
            return None
        token = int(np.argmax(r.logits))
        if token in self.lm.spec.stop:
            r.ended = "stop"
            return None
        r.tokens.append(token)
        if len(r.tokens) >= self.max_reply:
            r.ended, r.pending = "limit", token
        else:
            r.logits = self.engine.feed([token])
        return token

    def text(self) -> str:
        return self.lm.decode(self.reply.tokens) if self.reply is not None else ""

    def discard(self) -> None:
        """Speculation was wrong (the person went on): back to before the reply."""
        if self.reply is None:
            return
        if not self.engine.rollback(self.reply.mark):
            self.inexact_rollbacks += 1
        self.reply = None

    def close(self) -> None:
        """The reply (complete or cut short) stays in the conversation; the next turn begins."""
        r = self.reply
        if r is None:
            return
        tail = ([r.pending] if r.pending is not None else []) + self._close
        self.engine.feed(tail)
        self.reply = None
        self.reader = IncrementalPrefill(self.engine, "")
