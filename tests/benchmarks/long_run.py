"""E. A long run: hours of audio through one stream at file pace, in bounded memory.

The stream is Whisper tiny.en's (exported when missing) or any bundle given by --bundle.

Run: `.venv/bin/python tests/benchmarks/long_run.py [--hours 2] [--option step_ms=2000]`
(`--hours 0.1` as a smoke test; `--option KEY=VALUE` sets a stream option).

The audio is the clips of tests/data/speech/refs.tsv, each followed by --silence-s of silence,
repeated ("passes") until --hours is reached (whole clips); it is generated clip by clip, never
held whole. It goes through `run_loop` (file pace, `LoopConfig(stats_every_s, live=False)`) into
one stream, as `edgestream run` drives a file. First, untimed, one pass through a fresh stream
gives the expected lines per clip. Reported:
- resident memory (VmRSS) sampled every --every-min minutes of audio after a --warmup-min warm-up
  (both shrunk for short runs so that at least 4 intervals remain), growth from the first
  sample to the last and to the largest, in %;
- finals: count vs expected (lines per clip in the reference pass, summed over the clips fed),
  passes whose count differs, WER per pass (first, last, worst);
- periodic stats events: count vs floor(audio / --stats-every-s), their t strictly increasing,
  plus run_loop's closing stats event, and its figures (RTF, step percentiles).
--json also keeps every final with its pass (`final_lines`), to read a bad pass afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import streaming as S  # noqa: E402  (tests/benchmarks is not a package)

BLOCK = 1024


class ClipCycle:
    """An AudioSource at file pace: clip, silence, next clip ..., cycling until `total_s`
    (whole clips); generated piece by piece. Samples VmRSS at the given audio positions."""

    def __init__(self, clips: list[np.ndarray], silence_s: float, total_s: float,
                 rss_at: list[int]) -> None:
        self.sample_rate, self.channels = S.RATE, 1
        self.clips = clips
        self.silence = np.zeros(int(silence_s * S.RATE), np.float32)
        self.total = int(total_s * S.RATE)
        self.rss_at = list(rss_at)
        self.rss: list[tuple[float, int, float]] = []  # (audio s, bytes, wall s)
        self.pieces: list[tuple[int, int, int]] = []  # (pass, clip index, start sample)
        self.position = 0
        self._blocks = 0
        self._stop = False
        self._t0 = 0.0

    def __iter__(self) -> Iterator[np.ndarray]:
        self._t0 = time.perf_counter()
        i = 0
        while self.position < self.total and not self._stop:
            k = i % len(self.clips)
            self.pieces.append((i // len(self.clips), k, self.position))
            piece = np.concatenate([self.clips[k], self.silence])[:, None]
            i += 1
            for j in range(0, piece.shape[0], BLOCK):
                while self.rss_at and self.rss_at[0] <= self.position:
                    self.rss.append((self.rss_at.pop(0) / S.RATE, S.rss_bytes(),
                                     time.perf_counter() - self._t0))
                block = piece[j: j + BLOCK]
                self.position += block.shape[0]
                self._blocks += 1
                yield block
                if self._stop:
                    return
        while self.rss_at and self.rss_at[0] <= self.position:  # a sample at the very end
            self.rss.append((self.rss_at.pop(0) / S.RATE, S.rss_bytes(),
                             time.perf_counter() - self._t0))

    def take_gap(self) -> int:
        return 0

    def request_stop(self) -> None:
        self._stop = True

    def counters(self) -> dict[str, int]:
        return {"blocks": self._blocks, "dropped_blocks": 0, "input_overflows": 0}

    def close(self) -> None:
        pass


def recording_sinks() -> Any:
    """A SinkSet with no sinks that keeps finals and stats (small) and counts the rest."""
    from edgestream.runtime.events.sinks import SinkSet

    class Recording(SinkSet):
        def __init__(self) -> None:
            super().__init__([])
            self.finals: list[tuple[float, float, str, str]] = []
            self.stats: list[Any] = []
            self.counts: dict[str, int] = {}

        def emit(self, events: Any) -> None:
            events = list(events)
            for e in events:
                self.counts[e.type] = self.counts.get(e.type, 0) + 1
                if e.type == "final":
                    self.finals.append((e.start, e.end, e.text, e.reason))
                elif e.type == "stats":
                    self.stats.append(e)
            super().emit(events)

    return Recording()


def owner(pieces: list[tuple[int, int, int]], t: float) -> int:
    """Index in `pieces` of the piece (clip + its silence) holding audio time t."""
    at = int(t * S.RATE)
    lo, hi = 0, len(pieces) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pieces[mid][2] <= at:
            lo = mid
        else:
            hi = mid - 1
    return lo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests/benchmarks/long_run.py",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--warmup-min", type=float, default=10.0)
    ap.add_argument("--every-min", type=float, default=5.0)
    ap.add_argument("--stats-every-s", type=float, default=60.0)
    ap.add_argument("--silence-s", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whisper", "--bundle", dest="whisper", type=Path, default=S.DEFAULT_WHISPER,
                    help="the bundle streamed (any family; Whisper tiny.en exported when missing)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a stream option (JSON value), e.g. step_ms=2000: a coarser partial "
                         "cadence makes hours of Whisper audio affordable on a small CPU")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    except ValueError:
        ap.error("--option takes KEY=VALUE with a JSON value, e.g. step_ms=2000")
    if args.hours <= 0 or args.every_min <= 0 or args.stats_every_s <= 0:
        ap.error("--hours, --every-min and --stats-every-s must be positive")
    import logging

    logging.basicConfig(level=logging.ERROR)
    from edgestream.runtime.loop import LoopConfig, run_loop

    refs = S.refs()
    names = list(refs)
    clips = [S.read_clip(n) for n in names]
    pass_s = sum(c.size for c in clips) / S.RATE + len(clips) * args.silence_s
    total_s = args.hours * 3600
    warmup_s = min(args.warmup_min * 60, 0.25 * total_s)
    every_s = min(args.every_min * 60, (total_s - warmup_s) / 4)
    scaled = warmup_s < args.warmup_min * 60 or every_s < args.every_min * 60
    rss_at = [int((warmup_s + k * every_s) * S.RATE)
              for k in range(int((total_s - warmup_s) / every_s + 1e-9) + 1)]
    print(f"machine: load average {S.load_avg()}; {len(clips)} clips, one pass {pass_s:.1f} s; "
          f"{total_s:.0f} s of audio asked ({total_s / pass_s:.2f} passes); VmRSS after "
          f"{warmup_s / 60:.2f} min, then every {every_s / 60:.2f} min of audio"
          + (" (shrunk for this short run)" if scaled else "")
          + (f"; stream options {options}" if options else ""), flush=True)
    model = S.load_model(S.whisper_bundle(args.whisper), args.threads)

    # the reference pass: lines per clip in a fresh stream
    t = time.perf_counter()
    ref = model.stream(**options)
    one = np.concatenate([np.concatenate([c, np.zeros(int(args.silence_s * S.RATE),
                                                      np.float32)]) for c in clips])
    events = S.feed_file_pace(ref, one)
    starts = np.cumsum([0] + [c.size + int(args.silence_s * S.RATE) for c in clips])
    ref_pieces = [(0, k, int(s)) for k, s in enumerate(starts[:-1])]
    per_clip = [0] * len(clips)
    ref_text: list[list[str]] = [[] for _ in clips]
    for e in events:
        if e.type == "final":
            k = owner(ref_pieces, (e.start + e.end) / 2)
            per_clip[k] += 1
            ref_text[k].append(e.text)
    print(f"reference pass: {sum(per_clip)} finals ({', '.join(f'{n} {c}' for n, c in zip(names, per_clip))}), "
          f"WER {100 * S.wer(' '.join(refs[n] for n in names), S.finals_text(events)):.1f} %, "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    del ref, events

    source = ClipCycle(clips, args.silence_s, total_s, rss_at)
    stream = model.stream(**options)
    sinks = recording_sinks()
    t = time.perf_counter()
    try:
        code = run_loop(source, stream, sinks, LoopConfig(args.stats_every_s, live=False))
    finally:
        sinks.close()
    wall = time.perf_counter() - t
    audio_s = source.position / S.RATE
    family = model.bundle.manifest.family

    # finals per (pass, clip) vs the reference pass
    got: dict[tuple[int, int], int] = {}
    texts: dict[int, list[str]] = {}
    for start, end, text, _ in sinks.finals:
        p, k, _ = source.pieces[owner(source.pieces, (start + end) / 2)]
        got[(p, k)] = got.get((p, k), 0) + 1
        if text:
            texts.setdefault(p, []).append(text)
    fed = [(p, k) for p, k, _ in source.pieces]
    expected = sum(per_clip[k] for _, k in fed)
    differ = sorted({p for p, k in fed if got.get((p, k), 0) != per_clip[k]})
    passes = sorted({p for p, _ in fed})
    pass_wer = {}
    for p in passes:
        ks = [k for q, k in fed if q == p]
        pass_wer[p] = S.wer(" ".join(refs[names[k]] for k in ks), " ".join(texts.get(p, [])))
    reasons: dict[str, int] = {}
    for *_, reason in sinks.finals:
        reasons[reason] = reasons.get(reason, 0) + 1

    periodic, closing = sinks.stats[:-1], sinks.stats[-1] if sinks.stats else None
    want_stats = int(audio_s / args.stats_every_s + 1e-9)
    increasing = all(b.t > a.t for a, b in zip(periodic, periodic[1:]))
    rss = source.rss
    mib = 1 / 2**20
    growth = 100 * (rss[-1][1] / rss[0][1] - 1) if len(rss) > 1 else float("nan")
    growth_max = 100 * (max(r[1] for r in rss) / rss[0][1] - 1) if len(rss) > 1 else float("nan")

    S.table(f"E. long run: {audio_s / 3600:.3f} h ({audio_s:.0f} s, {len(passes)} passes or "
            f"part) of audio through one {family} stream at file pace, {args.threads} "
            f"threads, {wall:.0f} s wall, exit code {code}; load {S.load_avg()}",
            ["VmRSS sample at audio min", "MiB", "vs first", "wall s"],
            [[f"{a / 60:.2f}", f"{b * mib:.1f}", f"{100 * (b / rss[0][1] - 1):+.2f} %",
              f"{w:.0f}"] for a, b, w in rss],
            f"  growth first -> last sample: {growth:+.2f} %, first -> largest: "
            f"{growth_max:+.2f} % ({len(rss)} samples)")
    last = closing.values if closing else {}
    S.table("E. events", ["check", "value", ""],
            [["finals / expected", f"{len(sinks.finals)} / {expected}",
              "ok" if len(sinks.finals) == expected else "DIFFERENT"],
             ["passes whose finals per clip differ from the reference",
              f"{len(differ)} of {len(passes)}", ", ".join(map(str, differ[:20])) or "-"],
             ["final reasons", ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())), ""],
             ["finals without text (not retracted) / retracted",
              f"{sum(1 for f in sinks.finals if not f[2] and f[3] != 'retracted')} / "
              f"{reasons.get('retracted', 0)}", "lines whose speech produced no words"],
             ["WER per pass: first / last / worst",
              f"{100 * pass_wer[passes[0]]:.1f} / {100 * pass_wer[passes[-1]]:.1f} / "
              f"{100 * max(pass_wer.values()):.1f} %", "(last pass may be partial)"],
             ["periodic stats events / floor(audio / every)",
              f"{len(periodic)} / {want_stats}",
              ("ok" if len(periodic) == want_stats else "DIFFERENT")
              + ("" if increasing else ", t NOT increasing")],
             ["closing stats event", "present" if closing else "MISSING",
              f"audio_s {last.get('audio_s')}, rtf {last.get('rtf')}, step p50/p95/p99/max "
              f"{last.get('step_ms_p50')}/{last.get('step_ms_p95')}/{last.get('step_ms_p99')}/"
              f"{last.get('step_ms_max')} ms, EoS->final p50 {last.get('eos_to_final_ms_p50')} "
              "ms"],
             ["events by type", ", ".join(f"{k} {v}" for k, v in sorted(sinks.counts.items())),
              f"sink drops {sinks.dropped}"]],
            "  expected finals: the reference pass's finals per clip (attributed by the final's\n"
            "  midpoint to the clip + silence piece holding it), summed over every clip fed; a\n"
            "  stream carries context across lines, so a pass may legitimately\n"
            "  split a line differently: differing passes are listed, not failed.", align="lll")
    if args.json:
        args.json.write_text(json.dumps(dict(
            args={k: str(v) for k, v in vars(args).items()}, audio_s=audio_s, wall_s=wall,
            rss=rss, growth_pct=growth, growth_max_pct=growth_max, finals=len(sinks.finals),
            expected=expected, differing_passes=differ, pass_wer=pass_wer, reasons=reasons,
            empty_finals=[f for f in sinks.finals if not f[2]],
            # every final with its pass: a bad pass can be read line by line afterwards
            final_lines=[(source.pieces[owner(source.pieces, (a + b) / 2)][0], a, b, text, why)
                         for a, b, text, why in sinks.finals],
            periodic_stats=len(periodic), expected_stats=want_stats,
            closing_stats=last, counts=sinks.counts), indent=2, default=str), encoding="utf-8")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
