"""Whole-file transcription: Whisper windows cut at the quietest moment before the 30 s limit."""

from __future__ import annotations

import numpy as np

from edgestream.runtime.families.whisper.engine import WhisperEngine

SEARCH_S = 8.0  # look for a pause within the last 8 s of each window
FRAME_S = 0.1


def split_points(audio: np.ndarray, rate: int, window: int) -> list[tuple[int, int]]:
    """Cut `audio` into pieces of at most `window` samples, each cut at the lowest-energy
    100 ms frame of the piece's last `SEARCH_S` seconds, so no word is sliced in two."""
    pieces: list[tuple[int, int]] = []
    start = 0
    frame = int(FRAME_S * rate)
    while audio.size - start > window:
        lo = start + window - int(SEARCH_S * rate)
        region = audio[lo: start + window]
        n = region.size // frame
        energy = np.square(region[: n * frame].reshape(n, frame)).mean(axis=1)
        cut = lo + int(np.argmin(energy)) * frame + frame // 2
        pieces.append((start, cut))
        start = cut
    pieces.append((start, audio.size))
    return pieces


def transcribe_audio(engine: WhisperEngine, audio: np.ndarray, max_repeats: int = 4) -> str:
    """Greedy transcript of 16 kHz mono `audio` of any length."""
    rate = engine.bundle.manifest.audio.sample_rate
    window = engine.bundle.manifest.audio.window_samples
    texts: list[str] = []
    tok = engine.tokenizer
    for a, b in split_points(audio, rate, window):
        engine.encode(audio[a:b])
        out = engine.decode(max_repeats=max_repeats)
        text = tok.decode(engine.text_tokens(out.tokens)).strip()
        if text:
            texts.append(text)
    return " ".join(texts)
