"""`edgestream export`: argument handling and the parity report on the terminal."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from edgestream.export.build import ExportOptions, export_bundle
from edgestream.export.errors import ParityError


def run_export(args: argparse.Namespace) -> int:
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    opts = ExportOptions(source=args.source, out=args.output, revision=args.revision,
                         language=args.language, vad=args.vad,
                         parity_audio=tuple(args.parity_audio), force=args.force)
    try:
        report = export_bundle(opts)
    except ParityError as e:
        print(json.dumps(e.report, indent=2), file=sys.stderr)
        raise
    print(f"wrote {args.output}: parity passed, max logit diff {report['max_logit_diff']:.2e}, "
          f"max mel diff {report['max_mel_diff']:.2e}, greedy tokens identical on "
          f"{report['identical_clips']}/{len(report['clips'])} clips")
    return 0
