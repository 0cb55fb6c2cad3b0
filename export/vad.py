"""Silero VAD for the bundle: copied from the `silero-vad` package's ONNX file at export time, so
the device never needs that package (or the torch it depends on)."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgestream.export.errors import ExportError
from edgestream.runtime.bundle import sha256_file

VAD_FILE = "silero_vad.onnx"
# silero v5 at 16 kHz: 64 samples of context + 512 new samples per call, state [2, 1, 128]
WINDOW, CONTEXT = 512, 64


def add_silero_vad(out: Path) -> tuple[dict, dict]:
    """Copy the ONNX VAD into `out`; return its manifest graph entry and state pair."""
    try:
        from importlib.resources import files

        src = Path(str(files("silero_vad") / "data" / "silero_vad.onnx"))
    except ModuleNotFoundError as e:
        raise ExportError("the silero-vad package is not installed; `pip install silero-vad` "
                          "or export with --vad energy") from e
    if not src.is_file():
        raise ExportError(f"{src}: silero-vad's ONNX file is missing from the package")
    shutil.copyfile(src, out / VAD_FILE)
    graph = {"name": "vad", "file": VAD_FILE, "sha256": sha256_file(out / VAD_FILE),
             "precision": "fp32",
             "inputs": [{"name": "input", "dtype": "float32", "shape": [1, CONTEXT + WINDOW]},
                        {"name": "state", "dtype": "float32", "shape": [2, 1, 128]},
                        {"name": "sr", "dtype": "int64", "shape": []}],
             "outputs": [{"name": "output", "dtype": "float32", "shape": [1, 1]},
                         {"name": "stateN", "dtype": "float32", "shape": [2, 1, 128]}]}
    state = {"name": "vad_state", "graph": "vad", "input": "state", "output": "stateN",
             "shape": [2, 1, 128], "dtype": "float32", "update": "replace"}
    return graph, state
