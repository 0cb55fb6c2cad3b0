"""Moonshine Streaming's registration: streaming encoder-decoder, re-scored decoding."""

from __future__ import annotations

import dataclasses

from typing import Any

import numpy as np

from edgestream.runtime.families import Family, register
from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine
from edgestream.runtime.families.moonshine.policy import MoonshineOptions, MoonshinePolicy
from edgestream.runtime.transcript import Segment, Transcript


def _make(bundle: Any, options: MoonshineOptions) -> tuple[MoonshinePolicy, Any]:
    engine = StreamingEncDecEngine(bundle)
    return MoonshinePolicy(engine, options), engine.states


def _transcribe(model: Any, samples: np.ndarray, options: MoonshineOptions) -> Transcript:
    """A streaming model transcribes a file by streaming it: its finals are the segments."""
    own = {k: v for k, v in dataclasses.asdict(options).items() if k != "partial_ms"}
    stream = model.stream(partial_ms=10**9, speculative=False, **own)
    rate = model.sample_rate
    events = stream.feed(samples, rate) + stream.finish()
    segments = tuple(Segment(e.start, e.end, e.text) for e in events
                     if getattr(e, "type", "") == "final" and e.text)
    return Transcript(" ".join(s.text for s in segments), segments)


FAMILY = register(Family("moonshine_streaming", "streaming_encoder_decoder", MoonshineOptions,
                         "partial_ms", _make, _transcribe))
