"""Whisper's log-mel front end in numpy.

Matches ``transformers.WhisperFeatureExtractor`` (its torch STFT path, which is what it runs when
torch is installed) to about 1e-5 on speech, without importing either: the device side has only
numpy. The steps, in order: pad with zeros or trim to ``n_samples``; centred STFT with a periodic
Hann window over a reflect-padded signal; power spectrum; drop the last frame; slaney mel filter
bank (slaney scale, slaney area norm, 0 to 8 kHz); ``log10(max(x, 1e-10))``; floor at the window's
maximum minus 8; ``(x + 4) / 4``.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = ["WhisperLogMel", "slaney_mel_filters"]

# transformers builds Whisper's bank up to 8 kHz whatever the sampling rate.
MAX_FREQUENCY_HZ = 8000.0


class WhisperLogMel:
    """Compute Whisper input features for one window of 16 kHz mono audio.

    Args:
        n_mels: mel bands (80 for most Whisper models, 128 for large-v3 and turbo).
        n_samples: window length in samples; audio is zero-padded or trimmed to it (30 s).
        hop: STFT hop in samples.
        n_fft: STFT size and window length in samples.
        sample_rate: sampling rate the audio is at, in Hz.

    The STFT runs `PIECE_FRAMES` frames at a time (bounded transient memory); frames wholly in
    the zero padding skip it.

    Raises:
        ValueError: a parameter is not a positive integer, or ``n_samples`` is shorter than
            ``n_fft`` (reflect padding needs that much signal).
    """

    PIECE_FRAMES = 250

    def __init__(
        self,
        n_mels: int = 80,
        n_samples: int = 480000,
        hop: int = 160,
        n_fft: int = 400,
        sample_rate: int = 16000,
    ) -> None:
        params = (("n_mels", n_mels), ("n_samples", n_samples), ("hop", hop), ("n_fft", n_fft),
                  ("sample_rate", sample_rate))
        for name, value in params:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"WhisperLogMel: {name} must be a positive integer, got {value!r}")
        if n_samples < n_fft:
            raise ValueError(
                f"WhisperLogMel: n_samples ({n_samples}) must be at least n_fft ({n_fft})"
            )
        self.n_mels = int(n_mels)
        self.n_samples = int(n_samples)
        self.hop = int(hop)
        self.n_fft = int(n_fft)
        self.sample_rate = int(sample_rate)
        self.n_frames = self.n_samples // self.hop
        # torch.hann_window's default is the periodic window: n_fft points of an (n_fft+1) cosine.
        k = np.arange(self.n_fft, dtype=np.float64)
        self.window = (0.5 - 0.5 * np.cos(2.0 * np.pi * k / self.n_fft)).astype(np.float32)
        # [n_fft // 2 + 1, n_mels], float32 like the extractor's torch path.
        self.mel_filters = slaney_mel_filters(self.n_fft, self.n_mels, self.sample_rate)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Return float32 log-mel features shaped ``[n_mels, n_samples // hop]``.

        Args:
            audio: 1-D mono samples at ``sample_rate``; longer input is trimmed to its first
                ``n_samples``, shorter input is padded with silence at the end.
        """
        audio = np.asarray(audio)
        if audio.ndim != 1:
            raise ValueError(f"WhisperLogMel expects 1-D mono audio, got shape {audio.shape}")
        half = self.n_fft // 2
        n = min(audio.shape[0], self.n_samples)
        # Centre the frames: reflect-pad n_fft // 2 on both sides of the padded window.
        tail = half + self.n_samples
        padded = np.empty(tail + half, dtype=np.float32)
        padded[half : half + n] = audio[:n]
        padded[half + n : tail] = 0.0
        padded[:half] = padded[2 * half : half : -1]
        padded[tail:] = padded[tail - 2 : tail - 2 - half : -1]

        # Only the first n_frames frames (the extractor computes one more and drops it), a piece
        # of frames at a time: the frames, spectrum and power of a whole 30 s window would be
        # ~30 MB of transients at the process's peak, a piece's are under 1 MB.
        log_spec = np.empty((self.n_frames, self.n_mels), dtype=np.float32)
        step = padded.strides[0]
        silent = np.log10(np.float32(1e-10))  # what an all-zero frame comes to
        for first in range(0, self.n_frames, self.PIECE_FRAMES):
            count = min(self.PIECE_FRAMES, self.n_frames - first)
            lo = first * self.hop
            hi = lo + (count - 1) * self.hop + self.n_fft
            if not padded[lo:hi].any():  # the window's padding: no FFT needed
                log_spec[first: first + count] = silent
                continue
            frames = as_strided(padded[lo:], shape=(count, self.n_fft),
                                strides=(self.hop * step, step))
            spectrum = np.fft.rfft(frames * self.window, axis=1)  # complex64 on numpy >= 2
            power = spectrum.real**2 + spectrum.imag**2  # [frames, bins]
            # einsum's own loop, not BLAS: this product is small (250 x 201 x 80), and
            # OpenBLAS wakes its thread pool for it, which on a busy 2-core machine cost 16 ms
            # per piece instead of 1.2 ms (and leaves spinning threads beside onnxruntime's)
            mel = np.einsum("fb,bm->fm", power, self.mel_filters)
            np.log10(np.maximum(mel, np.float32(1e-10)), out=log_spec[first: first + count])
        np.maximum(log_spec, log_spec.max() - np.float32(8.0), out=log_spec)
        log_spec += np.float32(4.0)
        log_spec /= np.float32(4.0)
        return np.ascontiguousarray(log_spec.T, dtype=np.float32)


def slaney_mel_filters(n_fft: int, n_mels: int, sample_rate: int) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular mel filters, float32 ``[n_fft // 2 + 1, n_mels]``.

    The same bank as ``transformers.audio_utils.mel_filter_bank(num_frequency_bins=n_fft // 2 + 1,
    num_mel_filters=n_mels, min_frequency=0, max_frequency=8000, sampling_rate=sample_rate,
    norm="slaney", mel_scale="slaney")`` (computed in float64, then cast).
    """
    fft_freqs = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(MAX_FREQUENCY_HZ), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    widths = np.diff(hz_points)
    slopes = hz_points[None, :] - fft_freqs[:, None]  # [bins, n_mels + 2]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (hz_points[2:] - hz_points[:-2])  # equal area per band
    return filters.astype(np.float32)


# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
_LOG_START_HZ = 1000.0
_LOG_START_MEL = 15.0
_LOG_STEP = np.log(6.4) / 27.0
_MELS_PER_LOG = 27.0 / np.log(6.4)


def _hz_to_mel(hz: float | np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log = _LOG_START_MEL + np.log(np.maximum(hz, _LOG_START_HZ) / _LOG_START_HZ) * _MELS_PER_LOG
    return np.where(hz >= _LOG_START_HZ, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log = _LOG_START_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _LOG_START_MEL) - _LOG_START_MEL))
    return np.where(mel >= _LOG_START_MEL, log, linear)
