"""`edgestream`: the thin top-level command line. Each side registers its own commands through
the `edgestream.commands` entry point group (pyproject.toml): the runtime its transcribe and run,
the workstation side export and demo. This module knows neither side's flags.

Exit codes: 0 success (also after SIGTERM or the first Ctrl-C: the pending line is finalized),
1 a fault during streaming (reported as an `error` event), 2 a clear error about input, bundle,
option or device (message on stderr), 3 the microphone went away, 130 a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from typing import Sequence

from edgestream.runtime.errors import EdgestreamError

log = logging.getLogger("edgestream")


def _providers() -> list:
    found = sorted(entry_points(group="edgestream.commands"), key=lambda e: e.name)
    if not found:  # running from a source tree that was never installed: the device side
        from edgestream.runtime import commands

        return [commands.register]
    return [ep.load() for ep in found]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgestream", description="Real-time voice on edge "
                                     "devices: export models to bundles, stream them.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _providers():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.handler(args))
    except EdgestreamError as e:
        print(f"edgestream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
