"""Whisper on CPU, three engines side by side in one run: our bundle, transformers, CTranslate2.

Measures the wall time to transcribe the same clips (default: the four real-speech clips, about
61 s) with greedy English decoding and no timestamps, window by window: every engine gets the
windows that the runtime's own `split_points` cuts, so all see identical audio. Timed per engine:
log-mel features (the runtime's own for the bundle, transformers' WhisperFeatureExtractor for the
others) plus encoding and decoding. Not timed: loading models, one warm-up pass per engine.
Repetitions interleave the engines (rotating their order) so machine load affects all alike.
Reported per engine: median wall seconds over the runs for all clips, real-time factor
(wall / audio seconds), ratios to transformers eager and to CTranslate2 int8, and corpus WER
against `refs.tsv` (DESIGN.md section 7: same machine, same run, ratios, medians).
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

SPEECH = Path(os.environ.get("EDGESTREAM_SPEECH_DIR")
              or Path(__file__).resolve().parents[2] / "shared" / "data" / "speech")
DEFAULT_CLIPS = tuple(SPEECH / f"{n}.wav" for n in ("beckett", "arctic_a0007", "arctic_a0009",
                                                   "two_cities"))
DEFAULT_BUNDLE = Path.home() / ".cache" / "edgestream" / "whisper-tiny.en"
BUILTIN = "whisper-tiny.en"
RATE = 16000

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


def ensure_bundle(path: Path | None) -> Path:
    """The bundle to run: `path`, or builtin:whisper-tiny.en exported once into the cache."""
    if path is not None:
        return path
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        from edgestream.export.build import ExportOptions, export_bundle

        print(f"exporting builtin:{BUILTIN} into {DEFAULT_BUNDLE} (once)", flush=True)
        export_bundle(ExportOptions(f"builtin:{BUILTIN}", DEFAULT_BUNDLE, force=True))
    return DEFAULT_BUNDLE


def windows(engine_window: int, audio: np.ndarray) -> list[np.ndarray]:
    from edgestream.runtime.families.whisper.transcribe import split_points

    return [audio[a:b] for a, b in split_points(audio, RATE, engine_window)]


def make_engines(bundle_dir: Path, threads: int) -> tuple[dict[str, Transcriber], float]:
    """Load every engine (untimed); returns transcribe-one-clip functions and the load time."""
    import ctranslate2
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    from edgestream.export.ct2_whisper import builtin_folder, load_ct2_whisper
    from edgestream.runtime.bundle import Bundle
    from edgestream.runtime.session import SessionConfig
    from edgestream.runtime.families.whisper.transcribe import transcribe_audio
    from edgestream.runtime.families.whisper.engine import WhisperEngine

    t0 = time.perf_counter()
    ours = WhisperEngine(Bundle.open(bundle_dir, SessionConfig(provider="cpu", threads=threads)))
    m = ours.bundle.manifest
    window, max_tokens = m.audio.window_samples, m.decoding.max_tokens
    prompt = list(m.decoding.prompt)  # [sot, notimestamps] for tiny.en
    eot = m.tokenizer.special["eot"]
    folder = builtin_folder(BUILTIN)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()  # generate() warns on every call about max_length
    model, _ = load_ct2_whisper(folder)
    extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)

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
        w = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type=compute_type,
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

    engines: dict[str, Transcriber] = {
        "edgestream bundle (onnxruntime)": lambda audio: transcribe_audio(ours, audio),
        "transformers eager": hf_eager,
        "ctranslate2 float32": ct2("float32"),
        "ctranslate2 int8": ct2("int8"),
    }
    return engines, time.perf_counter() - t0


def load_refs(clips: list[Path]) -> list[str] | None:
    refs: dict[str, str] = {}
    for clip in clips:
        tsv = clip.parent / "refs.tsv"
        if tsv.is_file():
            for line in tsv.read_text(encoding="utf-8").splitlines():
                name, _, text = line.partition("\t")
                refs.setdefault(name, text)
    return [refs[c.name] for c in clips] if all(c.name in refs for c in clips) else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgestream.export.bench_whisper",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help=f"bundle folder (default: {DEFAULT_BUNDLE})")
    p.add_argument("--runs", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--clips", type=Path, nargs="+", default=list(DEFAULT_CLIPS))
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        p.error("--runs and --threads must be at least 1")

    from edgestream.runtime.audio.wav import read_wav, to_mono

    audios = []
    for clip in args.clips:
        wav = read_wav(clip)
        if wav.sample_rate != RATE:
            p.error(f"{clip}: {wav.sample_rate} Hz; this benchmark needs 16 kHz clips")
        audios.append(to_mono(wav.samples))
    audio_s = sum(a.size for a in audios) / RATE
    engines, load_s = make_engines(ensure_bundle(args.bundle), args.threads)
    results = {name: EngineResult(name) for name in engines}
    names = list(engines)
    for rep in range(args.runs + 1):  # rep 0 is the uncounted warm-up
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            texts = [engines[name](a) for a in audios]
            if rep:
                results[name].seconds.append(time.perf_counter() - t0)
            results[name].texts = texts

    refs = load_refs(args.clips)
    from edgestream.export.wer import word_error_rate
    import ctranslate2
    import onnxruntime
    import torch
    eager = results["transformers eager"].median
    int8 = results["ctranslate2 int8"].median
    rows = []
    for r in results.values():
        wer = word_error_rate(refs, r.texts) if refs is not None else None
        rows.append(dict(engine=r.name, median_s=r.median, rtf=r.median / audio_s,
                         vs_eager=r.median / eager, vs_ct2_int8=r.median / int8, wer=wer,
                         runs_s=r.seconds, texts=r.texts))
    machine = dict(cpu_count=os.cpu_count(), onnxruntime=onnxruntime.__version__,
                   ctranslate2=ctranslate2.__version__, torch=torch.__version__)
    print(f"{'engine':<32}{'median s':>10}{'RTF':>8}{'vs eager':>10}{'vs ct2 int8':>13}"
          f"{'WER':>8}")
    for row in rows:
        wer_s = f"{100 * row['wer']:.1f}%" if row["wer"] is not None else "n/a"
        print(f"{row['engine']:<32}{row['median_s']:>10.3f}{row['rtf']:>8.3f}"
              f"{row['vs_eager']:>10.2f}{row['vs_ct2_int8']:>13.2f}{wer_s:>8}")
    print(f"{len(args.clips)} clips, {audio_s:.1f} s audio; median of {args.runs} runs, "
          f"{args.threads} threads; cpu_count {machine['cpu_count']}, onnxruntime "
          f"{machine['onnxruntime']}, ctranslate2 {machine['ctranslate2']}, torch "
          f"{machine['torch']}; load {load_s:.1f} s (untimed)")
    if args.json:
        args.json.write_text(json.dumps(dict(
            machine=machine, runs=args.runs, threads=args.threads, audio_s=audio_s,
            clips=[str(c) for c in args.clips], engines=rows), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
