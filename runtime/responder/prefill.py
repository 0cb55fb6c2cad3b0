"""Reading along: the text of a turn arrives word by word (finals, confirmed partials) and may
be revised. BPE tokens of a growing text are not prefix-stable at its end, so the last token of
what is known is held back; when the text's tokens stop agreeing with what was fed, the engine
rolls back to the common prefix. The tokens fed at the end are exactly those of the finished
text tokenized whole."""

from __future__ import annotations

import numpy as np

from edgestream.runtime.responder.engine import LMEngine


class IncrementalPrefill:
    """Feeds `head + text` into `engine` from position `start` as `text` grows."""

    def __init__(self, engine: LMEngine, head: str) -> None:
        self.engine = engine
        self.head = head
        self.start = engine.position
        self.rollbacks = 0
        self.inexact = 0  # rollbacks deeper than the ring's margin

    def _target(self, text: str, tail: str = "") -> list[int]:
        return self.engine.lm.encode(self.head + text + tail)

    def _sync(self, target: list[int], logits: bool = False) -> None:
        fed = self.engine.tokens[self.start:]
        same = 0
        for a, b in zip(fed, target):
            if a != b:
                break
            same += 1
        if logits:  # the caller needs the last token's logits: feed at least that token
            same = min(same, len(target) - 1)
        if same < len(fed):
            self.rollbacks += 1
            if not self.engine.rollback(self.start + same):
                self.inexact += 1
        if len(target) > same:
            self.engine.feed(target[same:])

    def update(self, text: str) -> None:
        """The stable text so far: feed what is certain (all but its last token)."""
        target = self._target(text)[:-1]
        if target:
            self._sync(target)

    def finish(self, text: str, tail: str) -> np.ndarray:
        """The finished text plus `tail` (the role suffix and generation prompt): fed whole;
        returns the logits of the last token (the reply's first choice)."""
        self._sync(self._target(text, tail), logits=True)
        return self.engine.last_logits
