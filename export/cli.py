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
    p.add_argument("--quantize", default="none",
                   help="none; one precision for every model graph (int8: dynamic per-channel, "
                        "CPU; int4 / int8-nbits: MatMulNBits blocks, exact re-scoring; fp16: GPU); "
                        "per graph, e.g. encoder=int8,decoder=int4; int8-encoder; or auto: the "
                        "fastest candidate within --wer-budget. Every variant must pass the "
                        "accuracy gate against fp32 or nothing is written")
    p.add_argument("--block-size", type=int, default=32,
                   help="int4 / int8-nbits: weights per scale, 16, 32, 64, 128 or 256 (default 32)")
    p.add_argument("--target", default="cpu", choices=["cpu", "gpu"],
                   help="device class the precisions must suit (default cpu; fp16 is gpu only)")
    p.add_argument("--eval-audio", type=Path, default=None,
                   help="accuracy-gate folder: WAV clips and refs.tsv (file<TAB>text); default "
                        "the project's real clips (tests/data/speech)")
    p.add_argument("--wer-budget", type=float, default=1.0,
                   help="WER points over fp32 a quantized variant may lose (default 1.0)")
    p.add_argument("--min-agreement", type=float, default=0.90,
                   help="share of fp32's greedy tokens a variant must keep (default 0.90)")
    p.add_argument("--eval-windows", type=int, default=300,
                   help="overlapping windows (clean and noisy) the gate compares (default 300)")
    p.add_argument("--eval-wer-copies", type=int, default=3,
                   help="copies of every evaluation clip with 20 dB white noise that the gate's "
                        "WER also transcribes, for more words (default 3; 0: clean clips only)")
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
                         block_size=args.block_size, target=args.target,
                         eval_audio=args.eval_audio, wer_budget=args.wer_budget,
                         min_agreement=args.min_agreement, eval_windows=args.eval_windows,
                         eval_wer_copies=args.eval_wer_copies, lm=lm)
    try:
        report = export_bundle(opts)
    except ParityError as e:
        if "rows" not in e.report:  # the gate's message already holds its table
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
    accuracy = json.loads((args.output / "manifest.json").read_text()).get("accuracy")
    if accuracy:
        from edgestream.export.gate import format_table

        rows = accuracy["rows"]
        table = format_table(rows) if "wer" in rows[0] else json.dumps(rows, indent=2)
        print(f"accuracy gate ({accuracy['windows']} windows, WER budget "
              f"+{accuracy['wer_budget']}): shipped {accuracy['chosen']}\n{table}")
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
