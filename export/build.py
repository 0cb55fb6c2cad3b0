"""`edgestream export`: SOURCE -> bundle folder, written only when parity passes."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgestream.export.errors import ExportError, ParityError
from edgestream.export.sources import resolve
from edgestream.runtime.manifest import MANIFEST_NAME, parse_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked for. `parity_audio`: clips for the parity check (default: the demo
    clip shipped with the runtime)."""

    source: str
    out: Path
    revision: str | None = None
    language: str = "en"
    vad: str = "silero"
    parity_audio: tuple[Path, ...] = field(default_factory=tuple)
    force: bool = False


def default_parity_audio() -> tuple[Path, ...]:
    from importlib.resources import files

    return (Path(str(files("edgestream.runtime") / "assets" / "beckett.wav")),)


def export_bundle(opts: ExportOptions) -> dict:
    """Export, check parity, and move the bundle into place; returns the parity report."""
    if opts.out.exists() and any(opts.out.iterdir()) and not opts.force:
        raise ExportError(f"{opts.out}: output folder exists and is not empty; pass --force "
                          "to replace it")
    src = resolve(opts.source, opts.revision)
    if src.model_type != "whisper":
        raise ExportError(f"{opts.source}: model type {src.model_type!r} has no export recipe "
                          "yet (supported: whisper)")
    from edgestream.export.whisper_parity import check_whisper_parity
    from edgestream.export.whisper_recipe import export_whisper_graphs, load_whisper

    parts = load_whisper(src, opts.revision, opts.language)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.", dir=opts.out.parent))
    try:
        data = export_whisper_graphs(parts, tmp)
        if opts.vad == "silero":
            from edgestream.export.vad import add_silero_vad

            graph, state = add_silero_vad(tmp)
            data["graphs"].append(graph)
            data["states"].append(state)
            data["vad"] = "vad"
        parse_manifest(data)  # the same checks the device will run
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
        clips = list(opts.parity_audio or default_parity_audio())
        report = check_whisper_parity(parts.model, tmp, clips)
        data["parity"] = report
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
        if not report["passed"]:
            raise ParityError(f"{opts.source}: parity check failed, bundle not written:\n"
                              + json.dumps(report, indent=2), report)
        if opts.out.exists():
            shutil.rmtree(opts.out)
        tmp.rename(opts.out)
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
