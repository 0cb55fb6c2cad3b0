"""Tests for edgestream.runtime.audio.resample.StreamingResampler."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgestream.runtime.audio.resample import StreamingResampler


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    n = int(round(rate * seconds))
    return np.sin(2 * np.pi * freq * np.arange(n) / rate).astype(np.float32)


def _run(rs: StreamingResampler, x: np.ndarray, sizes: list[int] | None = None) -> np.ndarray:
    """Feed x in blocks of the given sizes (cycled), or in one call, then flush."""
    if sizes is None:
        return np.concatenate([rs.process(x), rs.flush()])
    outs, i, s = [], 0, 0
    while i < len(x):
        outs.append(rs.process(x[i : i + sizes[s % len(sizes)]]))
        i += sizes[s % len(sizes)]
        s += 1
    outs.append(rs.flush())
    return np.concatenate(outs)


@pytest.mark.parametrize("in_rate", [44100, 48000, 8000, 22050])
def test_sine_matches_analytic(in_rate: int) -> None:
    y = _run(StreamingResampler(in_rate, 16000), _tone(1000.0, in_rate, 0.5), sizes=[1024])
    assert y.dtype == np.float32
    want = np.sin(2 * np.pi * 1000.0 * np.arange(len(y)) / 16000)
    edge = 320  # 20 ms at 16 kHz, where the silence around the stream is in the filter's reach
    assert np.abs(y - want)[edge:-edge].max() < 2e-3


@pytest.mark.parametrize("in_rate,out_rate", [(48000, 16000), (44100, 16000), (8000, 16000)])
def test_chunking_does_not_change_output(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(in_rate // 4).astype(np.float32) * 0.3
    whole = _run(StreamingResampler(in_rate, out_rate), x)
    sizes = [int(s) for s in rng.integers(0, 700, size=50)]  # includes empty blocks
    chunked = _run(StreamingResampler(in_rate, out_rate), x, sizes=sizes)
    assert chunked.shape == whole.shape
    np.testing.assert_allclose(chunked, whole, atol=1e-6)


def test_passband_and_aliasing() -> None:
    def level(freq: float) -> float:
        y = _run(StreamingResampler(48000, 16000), _tone(freq, 48000, 0.5))
        return float(np.abs(y[800:-800]).max())

    assert level(7000.0) > 0.9
    assert level(10000.0) < 0.01  # would fold to 6 kHz


RATE_PAIRS = [(48000, 16000), (44100, 16000), (8000, 16000), (22050, 16000), (16000, 44100), (11025, 16000)]


@pytest.mark.parametrize("in_rate,out_rate", RATE_PAIRS)
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 12345])
def test_output_length(in_rate: int, out_rate: int, n: int) -> None:
    x = np.zeros(n, dtype=np.float32)
    got = len(_run(StreamingResampler(in_rate, out_rate), x, sizes=[333]))
    assert abs(got - round(n * out_rate / in_rate)) <= 1


def test_same_rate_is_exact_passthrough() -> None:
    rs = StreamingResampler(16000, 16000)
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(rs.process(x[:10]), x[:10])
    np.testing.assert_array_equal(rs.process(x[10:]), x[10:])
    assert rs.flush().shape == (0,)


def test_flush_resets_for_a_new_stream() -> None:
    rs = StreamingResampler(48000, 16000)
    x = _tone(440.0, 48000, 0.1)
    first = _run(rs, x)
    np.testing.assert_array_equal(_run(rs, x), first)


BAD_RATES = [(0, 16000), (16000, -1), (16000.0, 8000), (True, 16000), ("48000", 16000)]


@pytest.mark.parametrize("rates", BAD_RATES)
def test_bad_rates(rates: tuple) -> None:
    with pytest.raises(ValueError):
        StreamingResampler(*rates)


def test_rejects_multichannel_block() -> None:
    with pytest.raises(ValueError, match="1-D"):
        StreamingResampler(48000, 16000).process(np.zeros((10, 2), dtype=np.float32))


def test_speed_48k_in_1024_blocks() -> None:
    x = _tone(1000.0, 48000, 10.0)
    rs = StreamingResampler(48000, 16000)
    rs.process(x[:1024])  # warm-up
    rs.reset()
    start = time.perf_counter()
    _run(rs, x, sizes=[1024])
    elapsed = time.perf_counter() - start
    print(f"resample 10 s 48k->16k in 1024-sample blocks: {elapsed * 1e3:.1f} ms")
    # Generous bound so a busy CI box does not flake; typical is ~10-20 ms.
    assert elapsed < 0.5
