"""Streaming sample-rate conversion by a rational polyphase windowed-sinc filter.

Output sample ``k`` is the band-limited input evaluated at input time
``t = k * in_rate / out_rate`` (in input samples), i.e. at wall time ``k / out_rate``: the filter
is applied centred on ``t``, so there is no group delay in the output timeline. The price is
look-ahead: ``process`` holds back about ``ZERO_CROSSINGS / min(in_rate, out_rate)`` seconds of
input (2 ms when the lower rate is 16 kHz) until later input or ``flush`` arrives. The stream is
taken to be silent before its first sample and after its last, so ``process(all) + flush()``
yields ``ceil(n * out_rate / in_rate)`` samples in total, always within one of
``round(n * out_rate / in_rate)``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = ["StreamingResampler"]

# Zero crossings of the sinc on each side of the centre, counted at the lower of the two rates.
# With the Kaiser beta below this gives about 85 dB stop-band attenuation and a transition band
# of roughly +-8 % around the lower Nyquist frequency (see the module tests).
ZERO_CROSSINGS = 32
KAISER_BETA = 8.6
# Outputs computed per gather in the multi-phase path (about 1.5 MB of windows at 44.1 kHz).
_GATHER_OUTPUTS = 2048


class StreamingResampler:
    """Convert a mono float32 stream from ``in_rate`` to ``out_rate`` block by block.

    The low-pass cutoff is at the lower of the two Nyquist frequencies. Chunking does not change
    the result: any split of the input into blocks gives the same samples as one call. When the
    rates are equal the resampler is an exact pass-through with no delay.

    Args:
        in_rate: input sample rate in Hz, a positive integer.
        out_rate: output sample rate in Hz, a positive integer.

    Raises:
        ValueError: a rate is not a positive integer.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        for name, rate in (("in_rate", in_rate), ("out_rate", out_rate)):
            if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
                raise ValueError(f"{name} must be a positive integer number of Hz, got {rate!r}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        g = math.gcd(self.in_rate, self.out_rate)
        self._up = self.out_rate // g  # L: phases per input sample
        self._down = self.in_rate // g  # M: input samples advanced per L outputs
        self._passthrough = self._up == self._down
        self._weights, self._first_tap = _polyphase_table(self._up, self._down)
        self._taps = self._weights.shape[1]
        self.reset()

    def reset(self) -> None:
        """Forget all history and start a new stream."""
        # Input samples seen so far, and the absolute index of self._buf[0]. The buffer starts
        # with zeros standing for the silence before the stream.
        self._n_in = 0
        self._buf_start = self._first_tap
        self._buf = np.zeros(-self._first_tap, dtype=np.float32)
        self._k = 0  # index of the next output sample

    def process(self, block: np.ndarray) -> np.ndarray:
        """Feed the next mono block and return every output sample that is now complete.

        Args:
            block: 1-D array of samples (converted to float32).

        Returns:
            A float32 1-D array, possibly empty.
        """
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 1:
            raise ValueError(f"process expects a 1-D mono block, got shape {block.shape}")
        if self._passthrough:
            self._n_in += block.shape[0]
            return block.copy()
        self._buf = np.concatenate((self._buf, block))
        self._n_in += block.shape[0]
        # Output k reads inputs floor(k*M/L) + first_tap ... + taps - 1; it is ready once the last
        # of those has arrived.
        last_ready = self._n_in - 1 - (self._first_tap + self._taps - 1)
        return self._emit(_count_upto(last_ready, self._up, self._down))

    def flush(self) -> np.ndarray:
        """End the stream: return the held-back tail and reset for a new stream."""
        if self._passthrough:
            self.reset()
            return np.zeros(0, dtype=np.float32)
        total = -(-self._n_in * self._up // self._down)  # ceil(n * L / M)
        self._buf = np.concatenate((self._buf, np.zeros(self._taps + 1, dtype=np.float32)))
        out = self._emit(total)
        self.reset()
        return out

    def _emit(self, k_end: int) -> np.ndarray:
        """Compute outputs self._k .. k_end - 1 from the buffer and drop input no longer needed."""
        if k_end <= self._k:
            return np.zeros(0, dtype=np.float32)
        # Row i of `windows` is the taps-long input window that starts at buffer index i (a view).
        step = self._buf.strides[0]
        rows = self._buf.shape[0] - self._taps + 1
        windows = as_strided(self._buf, shape=(rows, self._taps), strides=(step, step))
        if self._up == 1:
            # Integer decimation: one phase, windows a fixed stride apart, so no gather is needed.
            first = self._k * self._down + self._first_tap - self._buf_start
            frames = windows[first :: self._down][: k_end - self._k]
            out = np.einsum("ij,j->i", frames, self._weights[0])
        else:
            out = np.empty(k_end - self._k, dtype=np.float32)
            # The gathered windows are outputs x taps floats: bound them so one call with a whole
            # file does not allocate gigabytes.
            for k0 in range(self._k, k_end, _GATHER_OUTPUTS):
                pos = np.arange(k0, min(k0 + _GATHER_OUTPUTS, k_end), dtype=np.int64) * self._down
                start = pos // self._up + self._first_tap - self._buf_start
                part = np.einsum("ij,ij->i", windows[start], self._weights[pos % self._up])
                out[k0 - self._k : k0 - self._k + part.shape[0]] = part
        self._k = k_end
        keep_from = (k_end * self._down) // self._up + self._first_tap
        self._buf = self._buf[keep_from - self._buf_start :]
        self._buf_start = keep_from
        return out


def _count_upto(n_last: int, up: int, down: int) -> int:
    """Number of k >= 0 with floor(k * down / up) <= n_last."""
    if n_last < 0:
        return 0
    return ((n_last + 1) * up - 1) // down + 1


def _polyphase_table(up: int, down: int) -> tuple[np.ndarray, int]:
    """Per-phase Kaiser-windowed sinc weights.

    Row ``p`` holds the weights for an output that falls ``p / up`` of the way between input
    samples ``n`` and ``n + 1``; column ``j`` multiplies input ``n + first_tap + j``.
    Returns ``(weights[up, taps] float32, first_tap)``.
    """
    # Cutoff in cycles per input sample: the input Nyquist (0.5) or the output one if lower.
    cutoff = 0.5 * min(1.0, up / down)
    half_width = ZERO_CROSSINGS / (2.0 * cutoff)  # in input samples
    reach = math.ceil(half_width)
    offsets = np.arange(-reach, reach + 2, dtype=np.float64)  # j in [-reach, reach + 1]
    frac = np.arange(up, dtype=np.float64)[:, None] / up
    tau = frac - offsets[None, :]  # output time minus input time, in input samples
    inside = np.abs(tau) < half_width
    ratio = np.where(inside, tau / half_width, 0.0)
    kaiser = np.i0(KAISER_BETA * np.sqrt(1.0 - ratio**2)) / np.i0(KAISER_BETA)
    window = np.where(inside, kaiser, 0.0)
    weights = 2.0 * cutoff * np.sinc(2.0 * cutoff * tau) * window
    # Exact unity gain at DC for every phase, so silence and DC offsets carry no phase ripple.
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32), -reach
