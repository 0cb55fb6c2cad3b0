"""Whisper's registration: windowed encoder-decoder, LocalAgreement with context."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgestream.runtime.families import Family, register
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.families.whisper.policy import WhisperOptions, WhisperPolicy
from edgestream.runtime.families.whisper.transcribe import transcribe_audio
from edgestream.runtime.transcript import Transcript


def _engine(bundle: Any, options: WhisperOptions) -> WhisperEngine:
    engine = WhisperEngine(bundle)
    engine.configure(options.language, options.task)
    return engine


def _make(bundle: Any, options: WhisperOptions) -> tuple[WhisperPolicy, Any]:
    engine = _engine(bundle, options)
    return WhisperPolicy(engine, options), engine.states


def _transcribe(model: Any, samples: np.ndarray, options: WhisperOptions) -> Transcript:
    # its own engine and state: thread-safe
    return transcribe_audio(_engine(model.bundle, options), samples,
                            max_repeats=options.max_repeats)


FAMILY = register(Family("whisper", "whisper_window", WhisperOptions, "step_ms", _make,
                         _transcribe))
