"""The workstation's commands: `export` (a model to a bundle, with its parity report) and
`demo`, which composes both sides: export Whisper tiny.en once, then stream a clip through it."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.resources import files
from pathlib import Path

DEMO_CLIP = "beckett.wav"


def register(sub: argparse._SubParsersAction) -> None:
    from edgestream.runtime.commands import add_session_args, add_stream_args

    p = sub.add_parser("export", help="export a model to a bundle (workstation)")
    p.add_argument("source", help="hub id, local transformers folder, CTranslate2 Whisper "
                                  "folder, or builtin:whisper-tiny.en")
    p.add_argument("-o", "--output", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--revision", help="hub revision")
    p.add_argument("--language", default="en", help="language for multilingual Whisper")
    p.add_argument("--vad", default="silero", choices=["silero", "none"],
                   help="ship Silero VAD in the bundle (default) or not")
    p.add_argument("--parity-audio", nargs="+", type=Path, default=(),
                   help="WAV clips for the parity check (default: the shipped demo clip)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int8-encoder"],
                   help="dynamic int8 weights (per channel) for every model graph, or only the "
                        "audio side (encoder, memory: keeps decoder re-scoring exact); the export "
                        "fails unless greedy tokens stay identical on every parity clip")
    p.add_argument("--chunk-ms", type=int, default=80,
                   help="streaming encoders: audio per encoder step, 20-320 ms (default 80)")
    p.add_argument("--window-semantics", default="transformers",
                   choices=["transformers", "inclusive"],
                   help="moonshine_streaming sliding windows: transformers' mask (16,4) = 15 past "
                        "+ 3 future frames (default, provable parity) or inclusive 16 + 4")
    p.add_argument("--max-memory-frames", type=int, default=0,
                   help="streaming encoders: cross-attention memory rows of 20 ms (default 1500 "
                        "= 30 s, at most the model's 4096); longer utterances are split")
    p.add_argument("--kv-slots", type=int, default=1024,
                   help="language models: rows of each ring KV buffer (pinned system prompt + "
                        "window + rollback margin; default 1024)")
    p.add_argument("--chunk-tokens", type=int, default=16,
                   help="language models: tokens per prefill chunk (default 16)")
    p.add_argument("--lm-precision", default="auto", choices=["auto", "fp32", "int8", "int4"],
                   help="language models: weight-only precision; auto ships the smallest that "
                        "passes the token-agreement and perplexity gate")
    p.set_defaults(handler=run_export)

    p = sub.add_parser("demo", help="offline demo: export builtin Whisper once, stream a clip")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgestream",
                   help="where the demo bundle is kept")
    p.add_argument("--fast", action="store_true", help="do not pace the clip in real time")
    add_stream_args(p)
    add_session_args(p)
    p.set_defaults(handler=demo)


def run_export(args: argparse.Namespace) -> int:
    from edgestream.export.build import ExportOptions, export_bundle
    from edgestream.export.errors import ParityError
    from edgestream.export.lm.recipe import LMExportOptions

    lm = LMExportOptions(args.kv_slots, args.chunk_tokens, args.lm_precision)
    opts = ExportOptions(source=args.source, out=args.output, revision=args.revision,
                         language=args.language, vad=args.vad,
                         parity_audio=tuple(args.parity_audio), force=args.force,
                         chunk_ms=args.chunk_ms, window_semantics=args.window_semantics,
                         max_memory_frames=args.max_memory_frames, quantize=args.quantize,
                         lm=lm)
    try:
        report = export_bundle(opts)
    except ParityError as e:
        print(json.dumps(e.report, indent=2), file=sys.stderr)
        raise
    if "generate" in report:  # a language model
        acc = json.loads((args.output / "manifest.json").read_text()).get("accuracy", {})
        print(f"wrote {args.output}: parity passed, greedy tokens identical on "
              f"{report['identical_prompts']}/{len(report['generate'])} prompts, max logit diff "
              f"{report['max_logit_diff']:.2e}, ring wrap ppl {report['ring']['ppl_after_wrap']:.2f}"
              f" (full attention {report['ring']['ppl_full_attention']:.2f}); precision "
              f"{acc.get('chosen', 'fp32')}")
        return 0
    front = ("max mel diff", report["max_mel_diff"]) if "max_mel_diff" in report else \
        ("max encoder diff", report["max_encoder_diff"])
    print(f"wrote {args.output}: parity passed, max logit diff {report['max_logit_diff']:.2e}, "
          f"{front[0]} {front[1]:.2e}, greedy tokens identical on "
          f"{report['identical_clips']}/{len(report['clips'])} clips")
    int8 = json.loads((args.output / "manifest.json").read_text()).get("accuracy_int8")
    if int8:
        print(f"int8 graphs: greedy tokens identical to the original on "
              f"{int8['identical_clips']}/{len(int8['clips'])} clips, max logit diff "
              f"{int8['max_logit_diff']:.2e}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from edgestream.runtime import load
    from edgestream.runtime.audio.sources import FileSource
    from edgestream.runtime.commands import serve

    bundle_dir = args.cache / "whisper-tiny.en"
    if not (bundle_dir / "manifest.json").is_file():
        print(f"edgestream demo: exporting builtin:whisper-tiny.en to {bundle_dir} (once)...",
              file=sys.stderr, flush=True)
        from edgestream.export.build import ExportOptions, export_bundle

        report = export_bundle(ExportOptions("builtin:whisper-tiny.en", bundle_dir, force=True))
        print(f"edgestream demo: parity ok (max logit diff {report['max_logit_diff']:.2e}, "
              f"{report['identical_clips']}/{len(report['clips'])} clips identical)",
              file=sys.stderr, flush=True)
    model = load(bundle_dir, args.provider, args.threads)
    clip = Path(str(files("edgestream.runtime") / "assets" / DEMO_CLIP))
    realtime = not args.fast
    source = FileSource(clip, realtime=realtime, backlog_s=args.backlog_s)
    pace = "real-time pace" if realtime else "as fast as it computes"
    return serve(model, source, f"{DEMO_CLIP} (demo clip, {pace})", realtime, args)
