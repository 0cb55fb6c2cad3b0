"""`edgestream` command line: export (workstation), transcribe, run, demo (device).

Exit codes: 0 success, 2 a clear error about input, bundle or device (message on stderr),
130 interrupted. `export` imports the workstation packages only when it is the command given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from edgestream.runtime.errors import EdgestreamError

log = logging.getLogger("edgestream")


def _add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"],
                   help="onnxruntime execution provider (default: CUDA if available, else CPU)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's)")


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jsonl", action="store_true", help="events as JSON lines on stdout")
    p.add_argument("--step-ms", type=int, default=500,
                   help="Whisper: re-decode cadence of the window (default 500)")
    p.add_argument("--partial-ms", type=int, default=200,
                   help="streaming encoders: re-decode cadence of the line (default 200)")
    p.add_argument("--endpoint-ms", type=int, default=640,
                   help="trailing silence that ends an utterance (default 640)")
    p.add_argument("--vad", default="auto", choices=["auto", "silero", "energy"],
                   help="speech gate: the bundle's Silero VAD if present (auto), or energy")
    p.add_argument("--energy-threshold-db", type=float, default=-40.0)
    p.add_argument("--stats-every", type=float, default=0.0, metavar="S",
                   help="also emit a stats event every S seconds of audio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgestream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("transcribe", help="print one transcript line per audio file")
    p.add_argument("bundle", type=Path)
    p.add_argument("files", nargs="+", type=Path)
    _add_session_args(p)

    p = sub.add_parser("run", help="stream captions from a microphone, a file or stdin")
    p.add_argument("bundle", type=Path, nargs="?")
    p.add_argument("--input", default="mic", help="mic, a WAV path, or - for raw s16le on stdin")
    p.add_argument("--device", help="capture device name (substring) or index")
    p.add_argument("--list-devices", action="store_true", help="list capture devices and exit")
    p.add_argument("--realtime", action="store_true", help="pace a file like a microphone")
    p.add_argument("--stdin-rate", type=int, default=16000)
    p.add_argument("--stdin-channels", type=int, default=1)
    _add_stream_args(p)
    _add_session_args(p)

    p = sub.add_parser("demo", help="offline demo: export builtin Whisper once, stream a clip")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgestream",
                   help="where the demo bundle is kept")
    p.add_argument("--fast", action="store_true", help="do not pace the clip in real time")
    _add_stream_args(p)
    _add_session_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "export":
            from edgestream.export.cli import run_export

            return run_export(args)
        from edgestream.runtime import commands

        return getattr(commands, args.command)(args)
    except EdgestreamError as e:
        print(f"edgestream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
