"""Transcripts written as text, SRT, WebVTT or JSON."""

from __future__ import annotations

import json

from edgestream.runtime.transcript import Transcript

FORMATS = ("txt", "srt", "vtt", "json")


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(max(0.0, seconds) * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def render(transcript: Transcript, fmt: str, name: str = "") -> str:
    if fmt == "txt":
        return transcript.text + "\n"
    if fmt == "json":
        return json.dumps({"file": name, "text": transcript.text,
                           "segments": [{"start": round(s.start, 3), "end": round(s.end, 3),
                                         "text": s.text} for s in transcript.segments]},
                          ensure_ascii=False, indent=2) + "\n"
    sep = "," if fmt == "srt" else "."
    blocks = []
    for i, s in enumerate(transcript.segments, 1):
        times = f"{_clock(s.start, sep)} --> {_clock(s.end, sep)}"
        blocks.append(f"{i}\n{times}\n{s.text}\n" if fmt == "srt" else f"{times}\n{s.text}\n")
    return ("WEBVTT\n\n" if fmt == "vtt" else "") + "\n".join(blocks)
