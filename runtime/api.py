"""The runtime as a library: a model loaded once, any number of independent streams.

    model = edgestream.runtime.load("bundles/whisper-tiny.en", provider="auto", threads=0)
    stream = model.stream(endpoint_ms=640)          # its own state; options checked here
    events = stream.feed(samples, 48000)            # float32 audio at any rate; events it caused
    events += stream.finish()                       # the last line, flushed
    text = model.transcribe(samples, 16000)         # a whole file

Sessions, weights and the tokenizer live in the model; state lives in the stream, so a second
stream costs its state bytes, not another copy of the weights. Streams of one model may be fed
from separate threads at the same time (onnxruntime sessions are safe to run concurrently; each
stream serialises its own calls).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgestream.runtime.audio.resample import StreamingResampler
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.errors import AudioInputError, BundleError, OptionError
from edgestream.runtime.events.stats import StreamStats, graph_summary
from edgestream.runtime.events.types import Event, Ready, Stats
from edgestream.runtime.families import Family, all_families, lookup
from edgestream.runtime.gate import Gate, GateConfig
from edgestream.runtime.session import check_execution, session_config
from edgestream.runtime.transcript import Transcript
from edgestream.runtime.vad import EndpointConfig, Endpointer, EnergyVad, SileroVad


@dataclass(frozen=True)
class StreamOptions:
    """Options every family takes. `vad`: auto (the bundle's Silero graph if it ships one),
    silero or energy; `speculative`: decode the final during the endpoint silence;
    `live`: the input is paced by a clock (a microphone): partial cadence adapts to compute."""

    endpoint_ms: int = 640
    vad: str = "auto"
    energy_threshold_db: float = -40.0
    speculative: bool = True
    speculate_ms: int = 160
    live: bool = False


def _check_options(family: Family, options: dict[str, Any]) -> tuple[StreamOptions, Any]:
    common = {f.name for f in dataclasses.fields(StreamOptions)}
    own = {f.name for f in dataclasses.fields(family.options)}
    for name in options:
        if name in common or name in own:
            continue
        others = [f.name for f in all_families()
                  if f is not family and name in {x.name for x in dataclasses.fields(f.options)}]
        if others:
            raise OptionError(f"option {name!r} applies to {', '.join(others)} bundles, not to "
                              f"this {family.name} bundle; its own options are "
                              f"{', '.join(sorted(own))}")
        raise OptionError(f"unknown stream option {name!r}; options are "
                          f"{', '.join(sorted(common | own))}")
    base = StreamOptions(**{k: v for k, v in options.items() if k in common})
    fam = family.options(**{k: v for k, v in options.items() if k in own})
    if base.vad not in ("auto", "silero", "energy"):
        raise OptionError(f"vad={base.vad!r}: use auto, silero or energy")
    for name, value, low in (("endpoint_ms", base.endpoint_ms, 64),
                             ("speculate_ms", base.speculate_ms, 0),
                             (family.cadence_option, getattr(fam, family.cadence_option), 20)):
        if not isinstance(value, int) or value < low:
            raise OptionError(f"{name}={value!r}: give a whole number of milliseconds >= {low}")
    return base, fam


class Model:
    """A validated bundle with its sessions and tokenizer; makes streams."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self.family = lookup(m.pipeline, f"{bundle.root}/manifest.json")
        self.sample_rate = m.audio.sample_rate
        self.chunk_samples = m.audio.chunk_samples

    @property
    def provider(self) -> str:
        """The execution provider the model graphs actually run on."""
        return self.bundle.sessions[self.bundle.manifest.graphs[0].name].session.get_providers()[0]

    def ready_event(self, input_label: str) -> Ready:
        """The `ready` event a loop emits first: bundle, family, provider, input."""
        m = self.bundle.manifest
        return Ready(str(self.bundle.root), m.family, m.pipeline, self.provider,
                     self.sample_rate, input_label)

    def stream_option_names(self) -> set[str]:
        """The stream options this bundle's family takes (common ones included)."""
        return ({f.name for f in dataclasses.fields(StreamOptions)} |
                {f.name for f in dataclasses.fields(self.family.options)})

    def stream(self, **options: Any) -> "Stream":
        """An independent stream. Options: see `StreamOptions` and the family's options
        (Whisper: `WhisperOptions`, Moonshine Streaming: `MoonshineOptions`)."""
        base, fam = _check_options(self.family, options)
        policy, states = self.family.make_policy(self.bundle, fam)
        vad_kind = base.vad
        m = self.bundle.manifest
        if vad_kind == "auto":
            vad_kind = "silero" if m.vad else "energy"
        if vad_kind == "silero" and not m.vad:
            raise OptionError(f"{self.bundle.root}: this bundle ships no VAD graph; use "
                              "vad='energy' (--vad energy) or re-export with --vad silero")
        vad = (SileroVad(self.bundle.sessions[m.vad], states, self.sample_rate)
               if vad_kind == "silero" else EnergyVad(base.energy_threshold_db))
        endpointer = Endpointer(vad, EndpointConfig(endpoint_ms=base.endpoint_ms),
                                self.sample_rate)
        config = GateConfig(cadence_ms=getattr(fam, self.family.cadence_option),
                            speculate_ms=base.speculate_ms, speculative=base.speculative,
                            adaptive=base.live, endpoint_ms=base.endpoint_ms)
        stats = StreamStats(self.sample_rate)
        return Stream(self, Gate(policy, endpointer, self.sample_rate, config, stats), states,
                      stats)

    def transcribe(self, samples: np.ndarray, sample_rate: int, **options: Any) -> str:
        """The transcript of a whole recording (float32, any rate, mono or [frames, channels]).
        `options`: the family's options (Whisper: `language`, None detects it, and `task`,
        transcribe or translate, for multilingual bundles; `max_repeats`)."""
        return self.transcribe_segments(samples, sample_rate, **options).text

    def transcribe_segments(self, samples: np.ndarray, sample_rate: int,
                            **options: Any) -> Transcript:
        """The transcript with timed segments (for subtitles)."""
        _, fam = _check_options(self.family, options)
        audio = _mono(samples, "transcribe")
        if sample_rate != self.sample_rate:
            r = StreamingResampler(_rate(sample_rate), self.sample_rate)
            audio = np.concatenate([r.process(audio), r.flush()])
        return self.family.transcribe(self, audio, fam)


def load(bundle: str | Path, provider: str = "auto", threads: int = 0,
         profile: Any = None, execution: str = "auto") -> Model:
    """Open and validate a bundle once: hashes, graph signatures, tokenizer, VAD graph.

    `profile`: a device profile (name, TOML path, `Profile`, or "auto" to detect) whose provider
    order, provider options, threads and captured-stream count apply (an explicit `provider` or
    `threads` wins). `execution`: host, bound (state resident on the device, IO binding) or auto
    (bound on a GPU provider, host on the CPU)."""
    if not isinstance(threads, int) or threads < 0:
        raise OptionError(f"threads={threads!r}: give 0 (onnxruntime's choice) or a positive "
                          "number of intra-op threads")
    check_execution(execution)
    _refuse_lm_bundle(Path(bundle))
    return Model(Bundle.open(Path(bundle), session_config(provider, threads, profile, execution)))


def _refuse_lm_bundle(root: Path) -> None:
    """A language-model bundle is not a speech model: say where it belongs."""
    from edgestream.runtime.manifest import load_manifest

    if root.is_dir() and (root / "manifest.json").is_file():
        m = load_manifest(root)
        if m.pipeline == "decoder_lm":
            raise BundleError(f"{root}: a {m.family} language-model bundle, not a speech model; "
                              f"give a speech bundle here and this one to --respond "
                              f"(edgestream run ASR_BUNDLE --respond {root}), or open it with "
                              "edgestream.runtime.responder.load_lm")


def _rate(sample_rate: Any) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or not 1000 <= int(sample_rate) <= 384000:
        raise AudioInputError(f"sample_rate={sample_rate!r}: give the rate of the samples in Hz "
                              "as a whole number between 1000 and 384000")
    return int(sample_rate)


def _mono(samples: Any, where: str) -> np.ndarray:
    a = np.asarray(samples)
    if a.dtype.kind != "f":
        raise AudioInputError(f"{where}: samples are {a.dtype}; give float audio in [-1, 1] "
                              "(divide 16-bit PCM by 32768)")
    if a.ndim == 2:
        a = a.mean(axis=1)
    elif a.ndim != 1:
        raise AudioInputError(f"{where}: samples have shape {a.shape}; give [frames] or "
                              "[frames, channels]")
    if not np.isfinite(a).all():
        raise AudioInputError(f"{where}: samples contain NaN or infinity")
    return np.ascontiguousarray(a, dtype=np.float32)


class Stream:
    """One audio stream through a model: its own state, VAD, lines and statistics."""

    def __init__(self, model: Model, gate: Gate, states: Any, stats: StreamStats) -> None:
        self.model = model
        self.gate = gate
        self.states = states
        self.stats = stats
        self._lock = threading.Lock()
        self._rate: int | None = None
        self._resampler: StreamingResampler | None = None
        self._pending = np.zeros(0, dtype=np.float32)
        self._finished = False

    @property
    def state_bytes(self) -> int:
        return int(self.states.nbytes)

    @property
    def behind(self) -> bool:
        return self.gate.behind

    @behind.setter
    def behind(self, value: bool) -> None:
        """Set by a live loop while its backlog is large: partials pause, finals stay exact."""
        self.gate.behind = value

    def feed(self, samples: np.ndarray, sample_rate: int) -> list[Event]:
        """Take float32 audio at `sample_rate`; returns the events it caused, in order."""
        audio = _mono(samples, "feed")
        rate = _rate(sample_rate)
        with self._lock:
            if self._finished:
                raise OptionError("this stream was finished; make a new one with model.stream()")
            if self._rate is None:
                self._rate = rate
                if rate != self.model.sample_rate:
                    self._resampler = StreamingResampler(rate, self.model.sample_rate)
            elif rate != self._rate:
                raise AudioInputError(f"feed: sample_rate changed from {self._rate} to {rate} "
                                      "Hz within one stream; use a stream per input format")
            if self._resampler is not None:
                audio = self._resampler.process(audio)
            return self._chunks(audio)

    def gap(self, seconds: float) -> list[Event]:
        """Input was lost: the open line is finalized before the hole and none spans it."""
        with self._lock:
            events = self._chunks(np.zeros(0, np.float32), flush=True)
            return events + self.gate.gap(int(round(seconds * self.model.sample_rate)))

    def end_line(self, reason: str) -> list[Event]:
        """Finalize the open line now (the input stopped, e.g. the device was lost); the stream
        goes on with the next audio."""
        with self._lock:
            events = self._chunks(np.zeros(0, np.float32), flush=True)
            return events + self.gate.finish(reason)

    def finish(self, reason: str = "end_of_input") -> list[Event]:
        """End of input: the last partial chunk and the open line are flushed."""
        with self._lock:
            if self._finished:
                return []
            self._finished = True
            tail = self._resampler.flush() if self._resampler is not None else \
                np.zeros(0, np.float32)
            events = self._chunks(tail, flush=True)
            return events + self.gate.finish(reason)

    def stats_event(self, **extra: Any) -> Stats:
        c = self.gate.counters
        execution = getattr(self.states, "execution", "host")
        return Stats(self.gate.now, self.stats.summary(
            speculative_used=c.speculative_used, speculative_discarded=c.speculative_discarded,
            gaps=c.gaps, gap_s=round(c.gap_s, 3), execution=execution,
            graphs=graph_summary(self.model.bundle.sessions), **extra))

    def _chunks(self, audio: np.ndarray, flush: bool = False) -> list[Event]:
        size = self.model.chunk_samples
        buf = np.concatenate([self._pending, audio]) if self._pending.size else audio
        n = buf.size // size
        events: list[Event] = []
        for i in range(n):
            events += self._step(buf[i * size: (i + 1) * size])
        self._pending = buf[n * size:]
        if flush and self._pending.size:
            events += self._step(self._pending)
            self._pending = np.zeros(0, np.float32)
        return events

    def _step(self, chunk: np.ndarray) -> list[Event]:
        started = time.perf_counter()
        events = self.gate.feed(chunk)
        self.stats.record(chunk.size, (time.perf_counter() - started) * 1000.0)
        return events
