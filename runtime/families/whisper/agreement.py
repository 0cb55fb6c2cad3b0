"""LocalAgreement-2 over Whisper token hypotheses.

Each step re-decodes the audio buffer, teacher-forcing what is already committed; the tokens on
which two consecutive hypotheses agree are committed, up to a word boundary so a word is never cut.
Committed tokens include Whisper's timestamp tokens: a closed segment (`... text <|end|><|start|>`)
tells where the buffer can be trimmed, and its text becomes a final caption line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Segment:
    """A closed, committed segment: its text tokens and its end in buffer timestamp steps."""

    tokens: tuple[int, ...]
    start_step: int
    end_step: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LocalAgreement:
    """Commit policy. `is_word_start(token)` is true for tokens that begin a new word."""

    def __init__(self, is_word_start: Callable[[int], bool], timestamp_begin: int) -> None:
        self.is_word_start = is_word_start
        self.tb = timestamp_begin
        self.committed: list[int] = []
        self.previous: list[int] | None = None

    def _boundary(self, hyp: Sequence[int], k: int) -> bool:
        return k == 0 or k >= len(hyp) or hyp[k] >= self.tb or self.is_word_start(hyp[k])

    def update(self, hyp: Sequence[int], complete: bool = False) -> list[int]:
        """Take a new hypothesis (which starts with the committed tokens); return what it adds
        to the committed prefix. `complete`: commit everything (endpoint, end of input)."""
        hyp = list(hyp)
        if hyp[: len(self.committed)] != self.committed:
            raise ValueError("hypothesis does not start with the committed tokens")
        if complete:
            agreed = len(hyp)
        else:
            agreed = 0 if self.previous is None else common_prefix(self.previous, hyp)
            # a word is only committed once the next word (or a timestamp) is agreed too
            while agreed > len(self.committed) and not (
                    agreed < len(hyp) and self._boundary(hyp, agreed)
                    and self._boundary(self.previous or [], agreed)):
                agreed -= 1
        self.previous = hyp
        new = hyp[len(self.committed): max(agreed, len(self.committed))]
        self.committed += new
        return new

    def closed_segment(self) -> Segment | None:
        """The first committed segment closed by an end timestamp that a next start follows."""
        start = None
        for i, tok in enumerate(self.committed):
            if tok < self.tb:
                continue
            if start is None:
                start = i
                continue
            if i > start + 1 and i + 1 < len(self.committed) and self.committed[i + 1] >= self.tb:
                text = tuple(t for t in self.committed[start + 1: i] if t < self.tb)
                return Segment(text, self.committed[start] - self.tb, tok - self.tb)
            start = i
        return None

    def trim(self, segment: Segment, shift: int | None = None) -> None:
        """Drop `segment` (its tokens up to its end timestamp). Later timestamps are rebased by
        `shift` steps (default: to count from the segment's end, where a caller that cuts the
        audio buffer there cuts it; 0 when the buffer is kept)."""
        end_token = self.tb + segment.end_step
        cut = self.committed.index(end_token) + 1
        self.committed = self.committed[cut:]
        self.rebase(segment.end_step if shift is None else shift)
        # the previous hypothesis no longer lines up with the committed tokens; agreement restarts
        self.previous = None

    def rebase(self, shift: int) -> None:
        """The audio buffer lost its first `shift` timestamp steps: move timestamps with it."""
        if shift:
            self.committed = [t - shift if t >= self.tb else t for t in self.committed]
            self.previous = None

    def reset(self) -> None:
        self.committed = []
        self.previous = None
