"""Streaming through the library API (`load(...).stream(...)`): accuracy, isolation, end-of-speech
latency and a live source slower than real time. Each section runs on its own (--sections).

Run: `.venv/bin/python tests/benchmarks/streaming.py [--runs N] [--sections A B C D]`. Clips and
references come from tests/data/speech (refs.tsv). Timed figures are medians over --runs; every
run makes fresh streams (loading and export are not timed).

A. Whisper tiny.en, per clip of refs.tsv: WER of `model.transcribe`, of the stream at file pace
   (fed 1024-frame blocks as fast as it computes, `live=False`) and of the stream paced like a
   microphone (`FileSource(realtime=True, backlog_s=4)` through `run_loop`, `live=True`); speech
   start -> first partial (audio seconds at file pace, wall seconds live) and partial stability.
B. Two streams of one Whisper model fed interleaved chunk by chunk (and from two threads) from two
   clips: events (type, line, text, reason) identical to each stream alone? Resident memory
   (VmRSS) growth for the second stream against its `state_bytes`.
C. End of speech to final with speculative=True / False side by side: Moonshine Streaming tiny at
   its published size (random weights, built by moonshine_streaming.py's `prepare`) and Whisper
   tiny.en, on the human clips: final compute after the endpoint decision p50/max, end of speech
   (last voiced VAD frame) to final p50, compute per audio second, speculative finals thrown away.
D. A live source into a model slower than real time, through `run_loop`: max lag, gaps, and no
   final across a gap. Default: Whisper tiny.en whose policy's partial/final sleep until they took
   --d-factor x the audio the policy received since its previous partial/final (an incremental
   model at that real-time factor); `--d-model moonshine-medium`: Moonshine Streaming medium at its
   published size with random weights instead.

The machine this was written on has 2 cores shared with other work: figures taken there are noisy
(the load average is printed with each section).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import wave
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

HERE = Path(__file__).resolve().parent
SPEECH = HERE.parents[0] / "data" / "speech"
RATE = 16000
BLOCK = 1024  # frames per feed call at file pace: the block FileSource yields
HUMAN_CLIPS = ("beckett", "arctic_a0007", "arctic_a0009", "two_cities")
DEFAULT_WHISPER = Path("/tmp/bench/tiny.en")
DEFAULT_WORK = Path("/tmp/edgestream-bench-streaming")
RANDOM_OPTIONS = dict(fallback=False, max_repeats=10**6)  # random weights loop: decode anyway


# -- shared helpers -----------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident memory of this process now (VmRSS of /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def refs() -> dict[str, str]:
    """clip name (without .wav) -> reference text, in refs.tsv order."""
    out = {}
    for line in (SPEECH / "refs.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, text = line.split("\t", 1)
            out[name.removesuffix(".wav")] = text
    return out


def read_clip(name: str) -> np.ndarray:
    from edgestream.runtime.audio.wav import read_wav, to_mono

    wav = read_wav(SPEECH / f"{name}.wav")
    if wav.sample_rate != RATE:
        raise SystemExit(f"{name}.wav: {wav.sample_rate} Hz, this benchmark wants {RATE}")
    return to_mono(wav.samples).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setparams((1, 2, RATE, 0, "NONE", "not compressed"))
        w.writeframes((audio * 32768).round().clip(-32768, 32767).astype("<i2").tobytes())


def whisper_bundle(path: Path) -> Path:
    """The real Whisper tiny.en bundle, exported once (about a minute) when missing."""
    if not (path / "manifest.json").exists():
        exe = Path(sys.executable).with_name("edgestream")
        print(f"exporting builtin:whisper-tiny.en to {path} ...", flush=True)
        subprocess.run([str(exe), "export", "builtin:whisper-tiny.en", "-o", str(path)],
                       check=True)
    return path


def moonshine_bundle(size: str, work: Path) -> Path:
    """Moonshine Streaming at a published size with random weights, built (once) by the
    moonshine_streaming benchmark's own `prepare` (fp32, 80 ms chunks, parity printed)."""
    root = work / f"moonshine-{size}"
    if (root / "fp32" / "manifest.json").exists():
        return root / "fp32"
    sys.path.insert(0, str(HERE))
    import moonshine_streaming as ms  # noqa: E402  (tests/benchmarks is not a package)

    clip = work / f"two_cities_{ms.PARITY_S}s.wav"  # the parity slice, as that benchmark cuts it
    write_wav(clip, read_clip("two_cities")[: ms.PARITY_S * ms.RATE])
    print(f"building random moonshine_streaming {size} at its published size in {root} "
          "(minutes) ...", flush=True)
    info = ms.prepare(size, root, 80, False, clip)
    p = info["parity"]
    print(f"  {info['params'] / 1e6:.1f} M parameters, export {info['export_s']:.0f} s, parity "
          f"passed {p['passed']}", flush=True)
    return info["bundles"]["fp32"]


def load_model(bundle: Path, threads: int) -> Any:
    from edgestream.runtime import load

    return load(bundle, provider="cpu", threads=threads)


def feed_file_pace(stream: Any, audio: np.ndarray, block: int = BLOCK) -> list[Any]:
    """The whole clip through `stream` as fast as it computes, then finish."""
    events: list[Any] = []
    for i in range(0, audio.size, block):
        events += stream.feed(audio[i: i + block], RATE)
    return events + stream.finish()


def finals_text(events: Iterable[Any]) -> str:
    return " ".join(e.text for e in events if e.type == "final" and e.text)


def wer(ref: str, hyp: str) -> float:
    from edgestream.export.wer import word_error_rate

    return word_error_rate([ref], [hyp])


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def table(title: str, headers: list[str], rows: list[list[Any]], legend: str = "",
          align: str = "") -> None:
    """Print rows under headers (floats with 3 decimals, strings as given); `align`: one l or r
    per column (default: first left, the rest right)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w)
                         for v, w, a in zip(values, widths, align)).rstrip()
    print(f"\n{title}")
    print(line(headers))
    for r in cells:
        print(line(r))
    if legend:
        print(legend.rstrip())
    sys.stdout.flush()


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3f}"
    return str(v)


def pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f} %"


# -- section A: accuracy, first partial, partial stability ---------------------------------------

WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    """Words as the stability measure compares them: lower case, punctuation dropped."""
    return WORD.findall(text.lower())


@dataclass
class LineMetrics:
    first_partial_s: list[float] = field(default_factory=list)  # per line with speech_started
    lines: int = 0  # lines with a speech_started event
    lines_without_partial: int = 0
    partials: int = 0
    revised: int = 0  # partials whose words a later partial of the line changed
    not_final_prefix: int = 0  # partials whose words are not a prefix of the line's final
    confirmed_broken: int = 0  # partials whose confirmed words a later partial/final changed


def line_metrics(events: list[Any], when: dict[int, float] | None = None,
                 t0: float = 0.0) -> LineMetrics:
    """`when`: id(event) -> wall time it reached the sinks (live runs; `t0` = wall time of the
    source's sample 0). Without it, times are audio seconds (`Partial.t`)."""
    m = LineMetrics()
    started: dict[int, float] = {}
    partials: dict[int, list[Any]] = defaultdict(list)
    finals: dict[int, Any] = {}
    for e in events:
        if e.type == "speech_started":
            started.setdefault(e.line, e.start)
        elif e.type == "partial":
            partials[e.line].append(e)
        elif e.type == "final":
            finals[e.line] = e
    for line, start in started.items():
        m.lines += 1
        if not partials[line]:
            m.lines_without_partial += 1
            continue
        p = partials[line][0]
        shown = when[id(p)] - t0 if when is not None else p.t
        m.first_partial_s.append(shown - start)
    def said(line: int) -> list[str] | None:
        """The line's final words; a Whisper "segment" final closes part of the speech and the
        rest goes on as the next line, so the next lines' finals are appended."""
        if line not in finals:
            return None
        rest = said(line + 1) if finals[line].reason == "segment" else None
        return words(finals[line].text) + (rest or [])

    for line, ps in partials.items():
        final = said(line)
        for i, p in enumerate(ps):
            w, c = words(p.text), words(p.confirmed)
            later = [words(q.text) for q in ps[i + 1:]]
            m.partials += 1
            m.revised += any(x[: len(w)] != w for x in later)
            if final is not None:
                m.not_final_prefix += final[: len(w)] != w
            m.confirmed_broken += any(x[: len(c)] != c for x in later + ([final] if final
                                                                          is not None else []))
    return m


class TimedSinkSet:
    """A SinkSet with no sinks that records when each event reached it (wall clock)."""

    def __init__(self) -> None:
        from edgestream.runtime.events.sinks import SinkSet

        class _Timed(SinkSet):
            def __init__(inner) -> None:
                super().__init__([])
                inner.events: list[Any] = []
                inner.when: dict[int, float] = {}

            def emit(inner, events: Iterable[Any]) -> None:
                now = time.monotonic()
                events = list(events)
                for e in events:
                    inner.events.append(e)
                    inner.when[id(e)] = now
                super().emit(events)

        self.sinks = _Timed()


def timed_source(path: Path, backlog_s: float) -> Any:
    """FileSource(realtime=True) that remembers the wall time its sample 0 was due."""
    from edgestream.runtime.audio.sources import FileSource

    class _Source(FileSource):
        t0 = 0.0

        def __iter__(self):  # type: ignore[override]
            self.t0 = time.monotonic()
            yield from super().__iter__()

    return _Source(path, realtime=True, backlog_s=backlog_s)


def run_live(model: Any, path: Path, options: dict[str, Any], backlog_s: float = 4.0,
             stats_every_s: float = 0.0, hook: Callable[[Any], None] | None = None
             ) -> tuple[list[Any], dict[int, float], float, Any]:
    """`path` through a live stream as the CLI's serve does: -> events, wall times, t0, stream.
    `hook(stream)` runs on the new stream before it starts."""
    from edgestream.runtime.loop import LoopConfig, run_loop

    stream = model.stream(live=True, **options)
    if hook is not None:
        hook(stream)
    source = timed_source(path, backlog_s)
    sinks = TimedSinkSet().sinks
    try:
        code = run_loop(source, stream, sinks, LoopConfig(stats_every_s, live=True))
    finally:
        sinks.close()
    if code:
        errors = [e for e in sinks.events if e.type == "error"]
        raise RuntimeError(f"run_loop exited {code}: {errors}")
    return sinks.events, sinks.when, source.t0, stream


def section_a(args: argparse.Namespace) -> dict[str, Any]:
    ref = refs()
    clips = [c for c in (args.clips or list(ref)) if c in ref]
    model = load_model(whisper_bundle(args.whisper), args.threads)
    audio = {c: read_clip(c) for c in clips}
    feed_file_pace(model.stream(), audio[clips[0]][: 2 * RATE])  # warm-up, untimed
    per: dict[str, dict[str, list[Any]]] = {c: defaultdict(list) for c in clips}
    for run in range(args.runs):
        for c in clips:
            r = per[c]
            t = time.perf_counter()
            r["transcribe"].append(model.transcribe(audio[c], RATE))
            r["transcribe_s"].append(time.perf_counter() - t)
            stream = model.stream()
            t = time.perf_counter()
            ev = feed_file_pace(stream, audio[c])
            r["file_s"].append(time.perf_counter() - t)
            r["file"].append(finals_text(ev))
            r["file_m"].append(line_metrics(ev))
            ev, when, t0, stream = run_live(model, SPEECH / f"{c}.wav", {})
            r["live"].append(finals_text(ev))
            r["live_m"].append(line_metrics(ev, when, t0))
            stats = [e for e in ev if e.type == "stats"][-1].values
            r["live_gaps"].append(stats["gaps"])
            r["live_gap_s"].append(stats["gap_s"])
            r["live_lag"].append(stats["max_lag_s"])
            print(f"  run {run + 1} {c}: transcribe {r['transcribe_s'][-1]:.1f} s, file pace "
                  f"{r['file_s'][-1]:.1f} s, live: {stats['gaps']} gaps, max lag "
                  f"{stats['max_lag_s']:.1f} s", flush=True)
    rows, rows2, hyps = [], [], defaultdict(list)
    for c in clips:
        r = per[c]
        w = {k: med([wer(ref[c], h) for h in r[k]]) for k in ("transcribe", "file", "live")}
        for k in ("transcribe", "file", "live"):
            hyps[k].append(r[k][-1])
        rows.append([c, f"{len(audio[c]) / RATE:.1f}", pct(w["transcribe"]), pct(w["file"]),
                     pct(w["live"]), f"{med(r['live_gaps']):g}/{med(r['live_gap_s']):.1f}",
                     f"{med(r['live_lag']):.2f}", f"{med(r['transcribe_s']):.2f}",
                     f"{med(r['file_s']):.2f}"])
        for mode in ("file", "live"):
            ms = r[f"{mode}_m"]
            m = ms[-1]
            rows2.append([c if mode == "file" else "", mode,
                          f"{med([med(x.first_partial_s) for x in ms]):.3f}",
                          f"{m.lines - m.lines_without_partial}/{m.lines}",
                          pct(med([x.revised / x.partials if x.partials else float("nan")
                                   for x in ms])),
                          f"{m.revised}/{m.partials}", m.not_final_prefix, m.confirmed_broken])
    from edgestream.export.wer import word_error_rate

    texts = [ref[c] for c in clips]
    overall = {k: word_error_rate(texts, hyps[k]) for k in ("transcribe", "file", "live")}
    rows.append(["all (corpus, last run)", f"{sum(a.size for a in audio.values()) / RATE:.1f}",
                 pct(overall["transcribe"]), pct(overall["file"]), pct(overall["live"]),
                 "", "", "", ""])
    head = f"median of {args.runs} runs, {args.threads} threads, load {load_avg()}"
    table(f"A1. Whisper tiny.en WER: transcribe vs run (file pace) vs run --realtime; {head}",
          ["clip", "audio s", "transcribe", "run file", "run live", "live gaps n/s",
           "live max lag s", "transcribe s", "run file s"], rows, A1_LEGEND)
    table(f"A2. first partial and partial stability; {head}",
          ["clip", "pace", "speech->1st partial s", "lines w/ partial", "revised share",
           "revised/partials", "not prefix of final", "confirmed changed"], rows2, A2_LEGEND)
    for c in clips:
        r = per[c]
        print(f"  {c}: transcribe: {r['transcribe'][-1]!r}\n  {' ' * len(c)}  file pace:  "
              f"{r['file'][-1]!r}\n  {' ' * len(c)}  live:       {r['live'][-1]!r}")
    return {c: dict(wer={k: [wer(ref[c], h) for h in per[c][k]]
                         for k in ("transcribe", "file", "live")},
                    texts={k: per[c][k][-1] for k in ("transcribe", "file", "live")},
                    file_metrics=[vars(m) for m in per[c]["file_m"]],
                    live_metrics=[vars(m) for m in per[c]["live_m"]],
                    **{k: per[c][k] for k in ("transcribe_s", "file_s", "live_gaps",
                                              "live_gap_s", "live_lag")})
            for c in clips} | dict(overall=overall)


A1_LEGEND = """\
  WER: edgestream.export.wer (Whisper's English normalizer); a run's text = its finals joined.
  run file: the stream fed 1024-frame blocks as fast as it computes (live=False).
  run live: FileSource(realtime=True, backlog_s=4) -> run_loop(LoopConfig(live=True)), stream
    live=True; gaps n/s: gaps reported / seconds the backlog dropped (lost audio costs WER);
    max lag: stats max_lag_s. transcribe s / run file s: wall seconds for the clip."""

A2_LEGEND = """\
  speech->1st partial: per line that has a speech_started event, its first partial minus the
    speech start (speech_started.start), median over those lines (then over runs); file pace in
    audio seconds (Partial.t - start), live in wall seconds (when the partial reached the sinks
    minus when the speech-start sample was captured: source start + start).
    lines w/ partial: lines that showed a partial before their final / lines (last run).
  revised: a partial is revised when some later partial of the same line does not begin with all
    of its words (words: lower case, punctuation dropped, compared in order; a later partial that
    is shorter also counts). revised share = revised / all partials (the last partial of a line
    cannot be revised and is counted in the denominator), median over runs; counts: last run.
  not prefix of final: partials whose words are not a prefix of their line's final (last run;
    a final with reason "segment" is followed by the next lines' finals, which continue it).
  confirmed changed: partials whose `confirmed` words a later partial or the line's final does
    not begin with (the confirmed prefix is promised stable: anything but 0 is a runtime bug)."""


# -- section B: two streams of one model ----------------------------------------------------------

def _key(events: Iterable[Any]) -> list[tuple]:
    return [(e.type, getattr(e, "line", None), getattr(e, "text", None),
             getattr(e, "reason", None)) for e in events if e.type != "stats"]


def _first_diff(a: list[tuple], b: list[tuple]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"event {i}: alone {x} vs paired {y}"
    return f"lengths {len(a)} vs {len(b)}" if len(a) != len(b) else ""


def _chunks(audio: np.ndarray, size: int) -> list[np.ndarray]:
    return [audio[i: i + size] for i in range(0, audio.size, size)]


def section_b(args: argparse.Namespace) -> dict[str, Any]:
    x_name, y_name = args.b_clips
    model = load_model(whisper_bundle(args.whisper), args.threads)
    x, y = read_clip(x_name), read_clip(y_name)
    size = model.chunk_samples
    feed_file_pace(model.stream(), x[: 2 * RATE])  # warm-up: sessions and arenas allocated
    gc.collect()
    rss0 = rss_bytes()
    alone, rss, state = {}, {}, {}
    streams = []
    for name, audio in ((x_name, x), (y_name, y)):
        s = model.stream()
        created = rss_bytes()
        ev = []
        for c in _chunks(audio, size):
            ev += s.feed(c, RATE)
        alone[name] = _key(ev + s.finish())
        gc.collect()
        rss[name] = (created, rss_bytes())
        state[name] = s.state_bytes
        streams.append(s)  # kept alive: the second is measured with the first still there
    first_grow = rss[x_name][1] - rss0
    second_grow = rss[y_name][1] - rss[x_name][1]
    second_created = rss[y_name][0] - rss[x_name][1]
    del streams
    gc.collect()

    results = {}
    for mode in ("interleaved", "two threads"):
        s1, s2 = model.stream(), model.stream()
        e1: list[Any] = []
        e2: list[Any] = []
        cx, cy = _chunks(x, size), _chunks(y, size)
        if mode == "interleaved":
            for i in range(max(len(cx), len(cy))):
                if i < len(cx):
                    e1 += s1.feed(cx[i], RATE)
                if i < len(cy):
                    e2 += s2.feed(cy[i], RATE)
            e1 += s1.finish()
            e2 += s2.finish()
        else:
            def work(s: Any, cs: list[np.ndarray], out: list[Any]) -> None:
                for c in cs:
                    out.extend(s.feed(c, RATE))
                out.extend(s.finish())
            ts = [threading.Thread(target=work, args=a) for a in ((s1, cx, e1), (s2, cy, e2))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        results[mode] = {x_name: (_key(e1) == alone[x_name], _first_diff(alone[x_name], _key(e1))),
                         y_name: (_key(e2) == alone[y_name], _first_diff(alone[y_name], _key(e2)))}
        del s1, s2
        gc.collect()
    rows = []
    for mode, r in results.items():
        for name, (same, diff) in r.items():
            rows.append([mode, name, len(alone[name]), "yes" if same else "NO", diff or "-"])
    table(f"B. two streams of one Whisper tiny.en model ({x_name} + {y_name}, "
          f"{size}-sample chunks), events vs each stream alone; load {load_avg()}",
          ["feeding", "clip", "events", "identical", "first difference"], rows,
          "  compared: (type, line, text, reason) of every event but stats, in order.")
    mb = 1 / 2**20
    table("B. resident memory (VmRSS, /proc/self/status) after warm-up "
          f"{rss0 * mb:.1f} MiB",
          ["", "MiB"],
          [["first stream, after its clip", f"{first_grow * mb:+.1f}"],
           ["second stream, just created (first still alive)", f"{second_created * mb:+.1f}"],
           ["second stream, after its clip", f"{second_grow * mb:+.1f}"],
           ["second stream's state_bytes", f"{state[y_name] * mb:.1f}"],
           ["growth / state_bytes", f"{second_grow / state[y_name]:.2f}"]],
          "  growth: VmRSS after the stream ran its clip minus before it was created (gc run);\n"
          "  state buffers are zero-filled pages, so they become resident as they are written.")
    return dict(events=results, rss0=rss0, rss=rss, state_bytes=state,
                second_growth=second_grow)


# -- section C: end of speech to final -----------------------------------------------------------

def _merged(hists: list[Any]) -> Any:
    from edgestream.runtime.events.stats import Histogram

    h = Histogram()
    for x in hists:
        h.counts += x.counts
        h.n += x.n
        h.total += x.total
        h.max = max(h.max, x.max)
    return h


def eos_run(model: Any, clips: dict[str, np.ndarray], options: dict[str, Any]) -> dict[str, float]:
    """Every clip through a fresh stream at file pace; histograms pooled over the clips."""
    streams = []
    for audio in clips.values():
        s = model.stream(**options)
        feed_file_pace(s, audio)
        streams.append(s)
    fc = _merged([s.stats.final_compute_ms for s in streams])
    ef = _merged([s.stats.eos_to_final_ms for s in streams])
    used = sum(s.gate.counters.speculative_used for s in streams)
    thrown = sum(s.gate.counters.speculative_discarded for s in streams)
    compute = sum(s.stats.compute_ms for s in streams) / 1000
    audio = sum(s.stats.audio_samples for s in streams) / RATE
    return dict(finals=fc.n, final_compute_p50=fc.percentile(50), final_compute_max=fc.max,
                eos_to_final_p50=ef.percentile(50), rtf=compute / audio, used=used,
                discarded=thrown, discarded_share=thrown / (used + thrown) if used + thrown
                else float("nan"))


def section_c(args: argparse.Namespace) -> dict[str, Any]:
    clips = {c: read_clip(c) for c in (args.clips or HUMAN_CLIPS) if c in HUMAN_CLIPS}
    models = []
    for name in args.c_models:
        if name == "whisper":
            models.append(("whisper tiny.en", load_model(whisper_bundle(args.whisper),
                                                          args.threads), {}))
        else:
            models.append((f"moonshine_streaming {name} (random)",
                           load_model(moonshine_bundle(name, args.work), args.threads),
                           dict(RANDOM_OPTIONS)))
    out: dict[str, Any] = {}
    rows = []
    for label, model, base in models:
        feed_file_pace(model.stream(**base), next(iter(clips.values()))[: 2 * RATE])  # warm-up
        runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for run in range(args.runs):
            for spec in ((True, False) if run % 2 == 0 else (False, True)):
                r = eos_run(model, clips, dict(base, speculative=spec))
                runs[spec].append(r)
                print(f"  run {run + 1} {label} speculative={spec}: rtf {r['rtf']:.3f}",
                      flush=True)
        for spec in (True, False):
            rs = runs[spec]
            m = {k: med([r[k] for r in rs]) for k in rs[0]}
            out[f"{label} speculative={spec}"] = dict(median=m, runs=rs)
            rows.append([label, "on" if spec else "off", f"{m['finals']:g}",
                         f"{m['final_compute_p50']:.1f}", f"{m['final_compute_max']:.1f}",
                         f"{m['eos_to_final_p50']:.1f}", f"{m['rtf']:.3f}",
                         _discarded(m, rs[-1]) if spec else "-"])
    seconds = sum(a.size for a in clips.values()) / RATE
    table(f"C. end of speech -> final on {', '.join(clips)} ({seconds:.1f} s), file pace, "
          f"endpoint 640 ms, speculate 160 ms; median of {args.runs} runs, {args.threads} "
          f"threads, load {load_avg()}",
          ["model", "specul.", "endpoint finals", "final compute p50 ms", "max ms",
           "EoS->final p50 ms", "compute/audio s", "speculative discarded"], rows, C_LEGEND)
    return out


def _discarded(m: dict[str, float], last: dict[str, float]) -> str:
    return f"{pct(m['discarded_share'])} ({last['discarded']}/{last['used'] + last['discarded']})"


C_LEGEND = """\
  final compute: compute after the endpoint decision (stats final_compute_ms; histogram
    percentiles, within 10 %); EoS->final: from the last voiced VAD frame to the final (silence
    waited + that compute; eos_to_final_ms); both pooled over the clips' endpoint finals (the
    end_of_input final is not an endpoint). compute/audio: every feed call's time / audio
    seconds (stats rtf). discarded: speculative finals thrown away because speech resumed,
    speculative_discarded / (used + discarded) (in brackets: last run's counts).
  Moonshine: random weights at the published size, fallback=False, max_repeats=10**6 (random
    weights loop; the decode budget is spent in full), so decode time is the worst case."""


# -- section D: a live source into a model slower than real time --------------------------------

def slow_down(stream: Any, factor: float, mode: str, step_s: float) -> None:
    """Make the stream's policy slower than real time by sleeping in partial() and final() (their
    own compute counts towards the target). mode "proportional": each call takes `factor` x the
    audio pushed to the policy since the line began or since the previous partial/final
    (whichever is later): an incremental model at `factor` x real time, whatever the cadence.
    mode "constant": each call takes `factor` x `step_s` (a re-decoding model like Whisper, whose
    cost per decode does not grow with the audio: `factor` x real time at the nominal cadence)."""
    policy = stream.gate.policy
    rate = stream.model.sample_rate
    state = {"pos": 0, "since": 0}
    push, begin, forget = policy.push, policy.begin, policy.forget

    def _push(audio: np.ndarray) -> None:
        state["pos"] += audio.size
        state["since"] += audio.size
        push(audio)

    def _begin(start: int) -> None:
        state["since"] = max(0, min(state["since"], state["pos"] - start))
        begin(start)

    def _forget(resume_at: int) -> None:
        state["pos"], state["since"] = resume_at, 0
        forget(resume_at)

    def padded(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            t = time.perf_counter()
            result = fn()
            target = factor * (state["since"] / rate if mode == "proportional" else step_s)
            time.sleep(max(0.0, target - (time.perf_counter() - t)))
            state["since"] = 0
            return result
        return call

    policy.push, policy.begin, policy.forget = _push, _begin, _forget
    policy.partial, policy.final = padded(policy.partial), padded(policy.final)


def concat_clips(seconds: float, names: Iterable[str], silence_s: float = 1.0) -> np.ndarray:
    """The clips with `silence_s` after each, repeated, cut to `seconds`."""
    pieces, total = [], 0
    want = int(seconds * RATE)
    names = list(names)
    i = 0
    while total < want:
        a = np.concatenate([read_clip(names[i % len(names)]),
                            np.zeros(int(silence_s * RATE), np.float32)])
        pieces.append(a)
        total += a.size
        i += 1
    return np.concatenate(pieces)[:want]


def section_d(args: argparse.Namespace) -> dict[str, Any]:
    backlog = args.backlog_s
    if args.d_model == "moonshine-medium":
        model = load_model(moonshine_bundle("medium", args.work), args.threads)
        options, label = dict(RANDOM_OPTIONS), "moonshine_streaming medium (random weights)"
        hook = None
    else:
        model = load_model(whisper_bundle(args.whisper), args.threads)
        options = {}
        label = (f"whisper tiny.en, partial/final slowed down ({args.d_delay}, "
                 f"{args.d_factor:g}x)")
        hook = lambda s: slow_down(s, args.d_factor, args.d_delay, 0.5)  # noqa: E731
    audio = concat_clips(args.d_seconds, HUMAN_CLIPS)
    path = args.work / f"live_{args.d_seconds:g}s.wav"
    write_wav(path, audio)
    feed_file_pace(model.stream(**options), read_clip("beckett")[: 2 * RATE])  # warm-up
    rows, out = [], []
    for run in range(args.runs):
        t = time.monotonic()
        events, when, t0, stream = run_live(model, path, options, backlog,
                                            stats_every_s=args.stats_every_s, hook=hook)
        wall = time.monotonic() - t
        all_stats = [e for e in events if e.type == "stats"]
        stats = all_stats[-1].values
        gaps = [e for e in events if e.type == "gap"]
        finals = [e for e in events if e.type == "final"]
        crossing = [(f.line, f.start, f.end, g.t, g.duration) for f in finals for g in gaps
                    if f.start < g.t + g.duration - 1e-6 and f.end > g.t + 1e-6]
        before_gap = sum(1 for g in gaps if any(f.reason == "gap" and abs(f.t - g.t) < 1e-6
                                                for f in finals))
        periodic = all_stats[:-1]  # run_loop's last stats event closes the run
        repeated = sum(1 for a, b in zip(periodic, periodic[1:]) if a.t == b.t)
        step_max = stats["step_ms_max"] / 1000
        bound = backlog + 1024 / RATE + step_max
        r = dict(wall_s=wall, file_s=audio.size / RATE, fed_s=stats["audio_s"],
                 clock_s=stream.gate.now, max_lag_s=stats["max_lag_s"], gaps=len(gaps),
                 gap_s=sum(g.duration for g in gaps), stats_gaps=stats["gaps"],
                 stats_gap_s=stats["gap_s"], finals=len(finals),
                 reasons=dict(Counter(f.reason for f in finals)), crossing=crossing,
                 gap_finals=before_gap, step_max_s=step_max, bound_s=bound,
                 strict_bound_s=backlog + 0.5, rtf=stats["rtf"],
                 notices=dict(Counter(e.kind for e in events if e.type == "notice")),
                 partials=sum(1 for e in events if e.type == "partial"),
                 periodic_stats=len(periodic), repeated_stats=repeated,
                 words=" ".join(f.text for f in finals if f.text))
        out.append(r)
        print(f"  run {run + 1}: {wall:.1f} s wall for {r['file_s']:.1f} s audio", flush=True)
    for i, r in enumerate(out):
        rows.append([i + 1, f"{r['file_s']:.2f}/{r['fed_s']:.2f}/{r['gap_s']:.2f}/"
                     f"{r['clock_s']:.2f}", f"{r['rtf']:.2f}", f"{r['max_lag_s']:.2f}",
                     f"{r['step_max_s']:.2f}",
                     f"{r['bound_s']:.2f} {'ok' if r['max_lag_s'] <= r['bound_s'] else 'OVER'}",
                     f"{r['strict_bound_s']:.2f} "
                     f"{'ok' if r['max_lag_s'] <= r['strict_bound_s'] else 'OVER'}",
                     f"{r['gaps']}/{r['gap_s']:.2f}", f"{r['stats_gaps']}/{r['stats_gap_s']:.2f}",
                     r["gap_finals"], r["finals"], r["partials"],
                     ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())),
                     len(r["crossing"]) or "none", f"{r['periodic_stats']}/{r['repeated_stats']}",
                     ", ".join(f"{k} {v}" for k, v in r["notices"].items()) or "-"])
    table(f"D. live source slower than real time: {label}; FileSource(realtime=True, "
          f"backlog_s={backlog:g}) -> run_loop(live=True, stats every {args.stats_every_s:g} s) "
          f"on {args.d_seconds:g} s of the human clips (1 s silences); {args.threads} threads, "
          f"load {load_avg()}",
          ["run", "file/fed/lost/clock s", "compute/fed", "max lag s", "longest step s",
           "backlog+block+step", "backlog+0.5 s", "gap events n/s", "stats gaps n/s",
           "gaps closing a line", "finals", "partials", "final reasons",
           "finals across a gap", "periodic stats/repeated", "notices"],
          [[str(c) for c in r] for r in rows], D_LEGEND)
    for r in out:
        if abs(r["fed_s"] + r["gap_s"] - r["file_s"]) > 1e-3:
            print(f"  ! fed + lost = {r['fed_s'] + r['gap_s']:.3f} s but the file has "
                  f"{r['file_s']:.3f} s: the source reported "
                  f"{r['fed_s'] + r['gap_s'] - r['file_s']:+.3f} s of lost audio that is not "
                  "in the file")
        if r["repeated_stats"]:
            print(f"  ! {r['repeated_stats']} periodic stats events repeat the previous one's t "
                  "(emitted twice after a gap jumped the clock)")
        for c in r["crossing"]:
            print(f"  ! final of line {c[0]} [{c[1]:.3f}, {c[2]:.3f}] overlaps the gap at "
                  f"{c[3]:.3f} s ({c[4]:.3f} s)")
        print(f"  finals: {r['words']!r}")
    return dict(runs=out)


D_LEGEND = """\
  file/fed/lost/clock: seconds in the file / fed to the stream (stats audio_s) / reported lost
    (gap events) / the stream clock at the end; fed + lost must equal the file.
  compute/fed: stats rtf (sleep included). max lag: stats max_lag_s (wall time since the source
    started minus audio fed or lost, after each block). Bounds: the backlog drops audio once the
    reader is more than backlog + one 1024-frame block behind and lag is taken after a block's
    feed, so lag <= backlog + block + the longest single feed call (stats step_ms_max) must
    hold; "backlog+0.5 s" is the stricter reading "backlog + one Whisper step (step_ms=500)".
  gap events: Gap events (count / seconds); stats gaps: the stream's own counters; gaps closing
    a line: gaps preceded by a final with reason "gap" at the gap's time.
  finals across a gap: finals whose [start, end] overlaps a hole [gap.t, gap.t + duration]
    (must be none). periodic stats/repeated: stats events before the closing one / those with
    the same t as the one before."""


# -- main ---------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "A": section_a, "B": section_b, "C": section_c, "D": section_d}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests/benchmarks/streaming.py",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), type=str.upper,
                    choices=list(SECTIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whisper", type=Path, default=DEFAULT_WHISPER,
                    help="Whisper tiny.en bundle (exported there when missing)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK,
                    help="random Moonshine bundles and generated WAV files")
    ap.add_argument("--clips", nargs="+", help="A and C: only these clips (names without .wav)")
    ap.add_argument("--b-clips", nargs=2, default=["beckett", "arctic_a0007"])
    ap.add_argument("--c-models", nargs="+", default=["tiny", "whisper"],
                    choices=["tiny", "medium", "whisper"],
                    help="C: moonshine sizes (random weights) and/or whisper")
    ap.add_argument("--d-model", choices=["whisper-delay", "moonshine-medium"],
                    default="whisper-delay")
    ap.add_argument("--d-factor", type=float, default=3.0,
                    help="D, whisper-delay: the policy's real-time factor")
    ap.add_argument("--d-delay", choices=["proportional", "constant"], default="proportional",
                    help="D, whisper-delay: how the delay scales (see slow_down)")
    ap.add_argument("--stats-every-s", type=float, default=5.0, help="D: periodic stats")
    ap.add_argument("--d-seconds", type=float, default=60.0)
    ap.add_argument("--backlog-s", type=float, default=4.0)
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        ap.error("--runs and --threads must be at least 1")
    if args.clips:
        unknown = set(args.clips) - set(refs())
        if unknown:
            ap.error(f"--clips: not in refs.tsv: {', '.join(sorted(unknown))}")
    args.work.mkdir(parents=True, exist_ok=True)
    import logging

    logging.basicConfig(level=logging.ERROR)
    import onnxruntime

    print(f"machine: {os.cpu_count()} CPUs, onnxruntime {onnxruntime.__version__}, numpy "
          f"{np.__version__}, load average {load_avg()}; figures on a shared machine are noisy",
          flush=True)
    results = {}
    for name in args.sections:
        t = time.perf_counter()
        results[name] = SECTIONS[name](args)
        print(f"[section {name}: {time.perf_counter() - t:.0f} s]", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                             sections=results), indent=2, default=str),
                             encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
