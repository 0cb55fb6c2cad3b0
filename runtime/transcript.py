"""A whole-file transcript: the text and its timed segments (subtitles are written from these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """A piece of the transcript with its place in the audio (seconds)."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    segments: tuple[Segment, ...]
    fallbacks: int = 0  # windows that needed a fallback decode (quality rules)
