"""The accuracy gate's evidence: a variant bundle measured against the fp32 bundle on speech.

The evaluation folder holds clips and `refs.tsv` (file, tab, reference text), like the project's
`tests/data/speech`; a `synthetic/` subfolder with its own clips adds windows. Measured per
variant, on this machine:
- WER of whole-file transcription (the runtime's own `transcribe`) of the referenced clips, each
  clean and in `WER_NOISE_COPIES` copies with seeded white noise at `WER_SNR_DB` (a different
  noise per copy), and its difference to fp32 in points. The copies give the WER its power: over
  the project's clips alone (187 words) one misheard name ("Gregson" as "Greggs in": two edits)
  moves it by 1.07 points, the whole default budget, and float-rounding-level changes of the
  log-mel flip such words; over the clean clips and their copies (748 words) it moves 0.27;
- greedy-token agreement over many windows: the clips cut into 4 s windows every 0.5 s, the same
  windows with white noise at 20 and 10 dB SNR (seeded); fp32's greedy tokens of each window are
  teacher-forced through both bundles in the runtime's K-token passes and the argmax compared at
  every position (so a few hundred windows and thousands of positions decide, not a few sentences);
  max logit difference on the positions of the first 16 windows;
- size of the model graphs on disk (external data included), median decoder step and encoder
  window latency.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgestream.export.errors import ExportError
from edgestream.export.wer import word_error_rate
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.errors import AudioInputError
from edgestream.runtime.session import SessionConfig

log = logging.getLogger(__name__)

REFS = "refs.tsv"
SNR_DB = (20.0, 10.0)  # noisy copies of every agreement window
WER_SNR_DB = 20.0  # the noisy copies transcribed for WER (10 dB is too hard for a tiny model)
WER_NOISE_COPIES = 3


@dataclass(frozen=True)
class EvalSet:
    """Clips with references (for WER) and the windows cut from every clip (for agreement)."""

    folder: str
    clips: tuple[tuple[str, np.ndarray, str], ...]  # (file, 16 kHz mono samples, reference)
    windows: tuple[np.ndarray, ...]
    # what WER is measured on: every clip clean, then its noisy copies ("file+20dB#1", ...)
    wer_clips: tuple[tuple[str, np.ndarray, str], ...] = ()

    @property
    def wer_words(self) -> int:
        """Reference words the WER is taken over (after Whisper's normalisation)."""
        from edgestream.export.wer import normalize

        return sum(len(normalize(text)) for _, _, text in self.wer_clips)


@dataclass(frozen=True)
class VariantResult:
    """One row of the accuracy table."""

    variant: str
    plan: dict[str, str]
    wer: float  # percent
    wer_delta: float  # points over fp32
    agreement: float  # share of teacher-forced positions whose argmax equals fp32's
    identical_windows: int
    windows: int
    positions: int
    max_logit_diff: float
    size_mb: float
    step_ms: float
    encode_ms: float
    block_step_diff: float | None = None  # moonshine: K-token passes vs one-token steps
    wer_words: int = 0  # reference words the WER is over (clean and noisy copies)
    passed: bool = True
    reason: str = ""

    def row(self) -> dict:
        return asdict(self)


def default_eval_dir() -> Path:
    """The project's real clips (tests/data/speech of the checkout this package runs from)."""
    return Path(__file__).resolve().parents[1] / "tests" / "data" / "speech"


def _read_refs(path: Path) -> list[tuple[str, str]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ExportError(f"{path}: line {i} is not 'file<TAB>reference text'")
        name, text = line.split("\t", 1)
        rows.append((name.strip(), text.strip()))
    return rows


def _read(path: Path, rate: int) -> np.ndarray:
    from edgestream.runtime.audio.resample import StreamingResampler
    from edgestream.runtime.audio.wav import read_wav, to_mono

    try:
        wav = read_wav(path)
    except (AudioInputError, OSError) as e:
        raise ExportError(f"{path}: evaluation audio is unreadable ({e}); fix or remove it from "
                          f"{REFS}") from e
    audio = to_mono(wav.samples).astype(np.float32)
    if wav.sample_rate != rate:
        r = StreamingResampler(wav.sample_rate, rate)
        audio = np.concatenate([r.process(audio), r.flush()])
    return audio


def _with_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """`audio` plus white noise at `snr_db` below its mean power."""
    power = float(np.mean(audio.astype(np.float64) ** 2)) or 1e-8
    noise = rng.standard_normal(audio.size) * np.sqrt(power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)


def load_eval_set(folder: Path, rate: int = 16000, window_s: float = 4.0, hop_s: float = 0.5,
                  max_windows: int = 300, seed: int = 0,
                  wer_noise_copies: int = WER_NOISE_COPIES) -> EvalSet:
    """Read `folder/refs.tsv` and its clips (and `synthetic/` clips, windows only); cut windows
    of `window_s` every `hop_s`, add their noisy copies, keep at most `max_windows` spread evenly
    over the list. The WER clips are the referenced clips clean and `wer_noise_copies` times with
    noise at `WER_SNR_DB` (the synthetic clips stay out of the WER: a tiny model mishears espeak's
    voices, about 29 % WER, which would drown the difference the gate looks for)."""
    folder = Path(folder)
    refs = folder / REFS
    if not refs.is_file():
        raise ExportError(f"{refs}: the evaluation folder needs a {REFS} (file, tab, reference "
                          "text per line); pass --eval-audio DIR with one")
    clips = []
    for name, text in _read_refs(refs):
        if not (folder / name).is_file():
            raise ExportError(f"{folder / name}: listed in {refs} but missing")
        clips.append((name, _read(folder / name, rate), text))
    if not clips:
        raise ExportError(f"{refs}: lists no clips")
    extra = []
    synthetic = folder / "synthetic" / REFS
    if synthetic.is_file():
        extra = [_read(synthetic.parent / n, rate) for n, _ in _read_refs(synthetic)]
    win, hop = int(window_s * rate), int(hop_s * rate)
    clean = []
    for audio in [c[1] for c in clips] + extra:
        starts = range(0, max(1, audio.size - win + hop), hop)
        clean += [audio[s: s + win] for s in starts if audio[s: s + win].size > rate // 2]
    rng = np.random.default_rng(seed)
    windows = list(clean)
    for snr in SNR_DB:
        windows += [_with_noise(w, snr, rng) for w in clean]
    if len(windows) > max_windows:
        keep = np.linspace(0, len(windows) - 1, max_windows).round().astype(int)
        windows = [windows[i] for i in keep]
    wer_clips = list(clips)
    for copy in range(1, wer_noise_copies + 1):  # its own generator: windows stay as they were
        noise_rng = np.random.default_rng([seed, copy])
        wer_clips += [(f"{name}+{WER_SNR_DB:g}dB#{copy}", _with_noise(audio, WER_SNR_DB,
                                                                      noise_rng), text)
                      for name, audio, text in clips]
    return EvalSet(str(folder), tuple(clips), tuple(windows), tuple(wer_clips))


def _model_bytes(bundle: Bundle) -> int:
    total = 0
    for g in bundle.manifest.graphs:
        if g.name == bundle.manifest.vad:
            continue
        total += (bundle.root / g.file).stat().st_size
        total += sum((bundle.root / d.file).stat().st_size for d in g.external_data)
    return total


class _WhisperProbe:
    """Runs one Whisper bundle over the evaluation set."""

    def __init__(self, root: Path, threads: int) -> None:
        from edgestream.runtime.families.whisper.engine import WhisperEngine

        self.engine = WhisperEngine(Bundle.open(root, SessionConfig("cpu", threads)))

    def transcribe(self, audio: np.ndarray) -> str:
        from edgestream.runtime.families.whisper.transcribe import transcribe_audio

        return transcribe_audio(self.engine, audio).text

    def greedy(self, window: np.ndarray, max_new: int) -> list[int]:
        self.engine.encode(window)
        return list(self.engine.decode(max_new=max_new, max_repeats=max_new).tokens)

    def forced(self, window: np.ndarray, seq: list[int]) -> np.ndarray:
        """Logits at every position of `seq`, teacher-forced K tokens per pass like the runtime
        re-scores (one token per step when the bundle has no K-token size)."""
        e = self.engine
        e.encode(window)
        k, out = e.block_size, []
        for start in range(0, len(seq), k):
            chunk = seq[start: start + k]
            if k > 1:
                out.append(e.block(chunk + [e.eot] * (k - len(chunk)), start)[: len(chunk)])
            else:
                out.append(np.stack([e.step(t, start + j) for j, t in enumerate(chunk)]))
        return np.concatenate(out)

    def latency(self, window: np.ndarray, runs: int = 5) -> tuple[float, float]:
        """(median decoder step ms at position 8, median encoder window ms)."""
        e = self.engine
        return (_median_ms(lambda: e.step(e.prompt[0], 8), runs * 4),
                _median_ms(lambda: e.encode(window), max(1, runs // 2)))


class _MoonshineProbe:
    """Runs one moonshine_streaming bundle over the evaluation set: a window is streamed chunk by
    chunk through the encoder (every frame once) and flushed, then decoded over that memory."""

    def __init__(self, root: Path, threads: int) -> None:
        from edgestream.runtime.api import Model
        from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine

        bundle = Bundle.open(root, SessionConfig("cpu", threads))
        self.engine = StreamingEncDecEngine(bundle)
        self.model = Model(bundle)
        self.prompt = self.engine.prompt

    def transcribe(self, audio: np.ndarray) -> str:
        """The whole file streamed through the runtime (VAD, lines, finals), as a user would."""
        return self.model.transcribe(audio, self.model.sample_rate)

    def _encode(self, window: np.ndarray) -> None:
        e = self.engine
        e.reset()
        for start in range(0, window.size, e.chunk):
            piece = window[start: start + e.chunk]
            if piece.size < e.chunk:  # the last partial chunk, zero-padded, its frames marked
                frames = -(-piece.size // e.frame_samples)
                e.push(np.pad(piece, (0, e.chunk - piece.size)), valid_frames=frames)
            else:
                e.push(piece)
        e.flush()

    def greedy(self, window: np.ndarray, max_new: int) -> list[int]:
        self._encode(window)
        return list(self.engine.decode(max_new=max_new, max_repeats=max_new).tokens)

    def forced(self, window: np.ndarray, seq: list[int]) -> np.ndarray:
        """Logits at every position of `seq` teacher-forced K tokens per pass (the runtime's
        re-scoring), one token per step when the bundle has no K-token size."""
        e = self.engine
        self._encode(window)
        k, out = e.block_size, []
        for start in range(0, len(seq), k):
            chunk = list(seq[start: start + k])
            if k > 1:
                out.append(e.block(chunk + [e.eos] * (k - len(chunk)), start)[: len(chunk)])
            else:
                out.append(np.stack([e.step(t, start + j) for j, t in enumerate(chunk)]))
        return np.concatenate(out)

    def block_vs_steps(self, window: np.ndarray, seq: list[int]) -> float | None:
        """Max |logit| difference between K-token passes and one-token steps over `seq` (exact
        re-scoring needs it within 1e-4); None without a K-token size."""
        if self.engine.block_size <= 1:
            return None
        blocks = self.forced(window, seq)  # the steps below overwrite the same K/V rows
        steps = np.stack([self.engine.step(t, i) for i, t in enumerate(seq)])
        return float(np.abs(blocks - steps).max())

    def latency(self, window: np.ndarray, runs: int = 5) -> tuple[float, float]:
        """(median decoder step ms at position 8, median ms to stream the window through the
        encoder and memory, flush included)."""
        return (_median_ms(lambda: self.engine.step(self.prompt[0], 8), runs * 4),
                _median_ms(lambda: self._encode(window), max(1, runs // 2)))


class Evaluator:
    """fp32 reference results computed once; `measure(variant)` gives a table row.

    Kept per window: fp32's greedy sequence and its argmax at every position; the full fp32
    logits only for the first `DIFF_WINDOWS` windows (the max logit difference is taken there),
    because 300 windows x 35 positions x a 51864-word vocabulary would hold 2 GB."""

    DIFF_WINDOWS = 16
    PROBE: type = _WhisperProbe

    def __init__(self, reference: Path, data: EvalSet, threads: int = 2,
                 max_new: int = 32) -> None:
        self.data, self.threads = data, threads
        ref = self.PROBE(reference, threads)
        self.prompt = list(ref.engine.prompt)
        self.sequences = [self.prompt + ref.greedy(w, max_new) for w in data.windows]
        self.ref_argmax: list[np.ndarray] = []
        self.ref_logits: list[np.ndarray] = []
        for i, (w, seq) in enumerate(zip(data.windows, self.sequences)):
            logits = ref.forced(w, seq)
            self.ref_argmax.append(logits.argmax(-1))
            if i < self.DIFF_WINDOWS:
                self.ref_logits.append(logits)
        self.ref_wer = 100.0 * word_error_rate(
            [c[2] for c in data.wer_clips], [ref.transcribe(c[1]) for c in data.wer_clips])
        self.reference = self.measure(reference, "fp32", {}, probe=ref)

    def measure(self, root: Path, name: str, plan: dict[str, str],
                probe: _WhisperProbe | _MoonshineProbe | None = None) -> VariantResult:
        probe = probe or self.PROBE(root, self.threads)
        p = len(self.prompt) - 1  # the first position whose argmax is a generated token
        agree = positions = identical = 0
        diff = 0.0
        for i, (w, seq) in enumerate(zip(self.data.windows, self.sequences)):
            if name == "fp32":  # the reference itself: its own argmax, not run a second time
                positions += len(seq) - p
                agree += len(seq) - p
                identical += 1
                continue
            logits = probe.forced(w, seq)
            same = logits[p:].argmax(-1) == self.ref_argmax[i][p:]
            agree += int(same.sum())
            positions += same.size
            identical += bool(same.all())
            if i < len(self.ref_logits):
                diff = max(diff, float(np.abs(logits[p:] - self.ref_logits[i][p:]).max()))
        refs = [c[2] for c in self.data.wer_clips]
        wer = self.ref_wer if name == "fp32" else 100.0 * word_error_rate(
            refs, [probe.transcribe(c[1]) for c in self.data.wer_clips])
        step_ms, enc_ms = probe.latency(self.data.windows[0])
        rescoring = None
        if hasattr(probe, "block_vs_steps"):  # the longest fp32 sequence of the first windows
            seq = max(self.sequences[: self.DIFF_WINDOWS], key=len)
            rescoring = probe.block_vs_steps(self.data.windows[self.sequences.index(seq)], seq)
        return VariantResult(name, plan, round(wer, 2), round(wer - self.ref_wer, 2),
                             round(agree / max(positions, 1), 4), identical,
                             len(self.data.windows), positions, diff,
                             round(_model_bytes(probe.engine.bundle) / 1e6, 2),
                             round(step_ms, 3), round(enc_ms, 1), rescoring,
                             wer_words=self.data.wer_words)


class WhisperEvaluator(Evaluator):
    """Whisper: each window is one encoder pass (padded to 30 s), decoded over its output."""

    PROBE = _WhisperProbe


class MoonshineEvaluator(Evaluator):
    """moonshine_streaming: each window streamed through encoder and memory, then decoded; the
    row also carries the block-vs-step logit difference (exact re-scoring)."""

    PROBE = _MoonshineProbe


EVALUATORS: dict[str, type[Evaluator]] = {"whisper": WhisperEvaluator,
                                          "moonshine_streaming": MoonshineEvaluator}


def _median_ms(run: Callable[[], object], times: int) -> float:
    """Median wall time of `run()` over `times` calls, in ms (the gate's latency columns)."""
    took = []
    for _ in range(times):
        t = time.perf_counter()
        run()
        took.append(time.perf_counter() - t)
    return statistics.median(took) * 1e3
