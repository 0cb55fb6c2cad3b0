"""Regenerate repeats_beckett.wav: the first 1.3 s of arctic_a0009.wav ("He turned sharply and")
six times back to back, then the whole of beckett.wav. 16 kHz mono 16-bit, samples copied
unchanged (no fades, no resampling). Run: python tests/data/speech/make_repeats.py"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RATE = 16000
CUT_S = 1.3  # in the pause between "and" and "faced" (quietest 10 ms frame of 1.15-1.45 s)
REPEATS = 6
OUT = HERE / "repeats_beckett.wav"


def read(name: str) -> np.ndarray:
    with wave.open(str(HERE / name), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2), name
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def frame_rms(x: np.ndarray, start: int, n: int = RATE // 100) -> float:
    return float(np.sqrt(np.mean((x[start:start + n] / 32768.0) ** 2)))


def main() -> None:
    arctic, beckett = read("arctic_a0009.wav"), read("beckett.wav")
    cut = round(CUT_S * RATE)
    for ms in range(-30, 40, 10):  # the cut should sit in a quiet stretch between words
        start = cut + ms * RATE // 1000
        print(f"RMS {start / RATE:.2f}-{start / RATE + 0.01:.2f} s: {frame_rms(arctic, start):.5f}")
    audio = np.concatenate([np.tile(arctic[:cut], REPEATS), beckett]).astype("<i2")
    with wave.open(str(OUT), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(audio.tobytes())
    print(f"wrote {OUT.name}: {audio.size} samples, {audio.size / RATE:.3f} s")


if __name__ == "__main__":
    main()
