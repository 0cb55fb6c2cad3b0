"""`edgestream export`: argument handling and the parity report on the terminal."""

from __future__ import annotations

import argparse
import json
import sys

from edgestream.export.build import ExportOptions, export_bundle
from edgestream.export.errors import ParityError


def run_export(args: argparse.Namespace) -> int:
    opts = ExportOptions(source=args.source, out=args.output, revision=args.revision,
                         language=args.language, vad=args.vad,
                         parity_audio=tuple(args.parity_audio), force=args.force,
                         chunk_ms=args.chunk_ms, window_semantics=args.window_semantics,
                         max_memory_frames=args.max_memory_frames, quantize=args.quantize)
    try:
        report = export_bundle(opts)
    except ParityError as e:
        print(json.dumps(e.report, indent=2), file=sys.stderr)
        raise
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
