"""The device path never imports the workstation stack (torch, transformers, optimum, onnx).

A fresh interpreter installs an import blocker first, so any attempt, even one wrapped in
`try/except ImportError`, is recorded; it then imports the runtime modules, opens the tiny bundle,
transcribes a clip and streams a clip through the `run` command, all in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BLOCKED = ("torch", "transformers", "optimum", "onnx")

SCRIPT = r'''
import json, sys

BLOCKED = tuple(json.loads(sys.argv[1]))
attempts = []


class Blocker:
    """Refuses the workstation packages (and their submodules); `onnxruntime` is not `onnx`."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} must not be imported on the device path")
        return None


sys.meta_path.insert(0, Blocker())

import contextlib, io
from pathlib import Path

import edgestream.runtime.cli as cli
import edgestream.runtime.commands, edgestream.runtime.bundle, edgestream.runtime.families.whisper.engine
import edgestream.runtime.families.whisper.policy, edgestream.runtime.audio.mic, edgestream.runtime.loop
import edgestream.runtime.events.sinks
import edgestream.runtime.families.moonshine.family, edgestream.runtime.gate
from edgestream.runtime import load
from edgestream.runtime.audio.wav import read_wav

bundle_dir, clip, short = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
model = load(bundle_dir, provider="cpu")
wav = read_wav(clip)
text = model.transcribe(wav.samples, wav.sample_rate)
assert isinstance(text, str)
stream = model.stream()
events = stream.feed(wav.samples[:, 0], wav.sample_rate) + stream.finish()
assert events and events[-1].type == "final", events

out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = cli.main(["run", str(bundle_dir), "--input", str(short), "--jsonl",
                     "--provider", "cpu"])
assert code == 0, code
events = [json.loads(line) for line in out.getvalue().splitlines()]
assert events[0]["type"] == "ready" and events[-1]["type"] == "stats", events

loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"attempts": attempts, "loaded": loaded,
                  "export_loaded": sorted(m for m in sys.modules
                                          if m.startswith("edgestream.export"))}))
'''


def test_device_path_imports_no_workstation_package(tiny_bundle: Path, tmp_path: Path) -> None:
    import wave

    from edgestream.runtime import cli

    clip = Path(cli.__file__).parent / "assets" / "beckett.wav"
    short = tmp_path / "short.wav"
    with wave.open(str(clip), "rb") as src, wave.open(str(short), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(2 * src.getframerate()))

    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(BLOCKED), str(tiny_bundle),
                        str(clip), str(short)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["attempts"] == [], f"the device path tried to import {report['attempts']}"
    assert report["loaded"] == []
    # the command line loads each side's command registration; of the workstation side that
    # is its argument parser module only, which imports nothing heavy
    assert set(report["export_loaded"]) <= {"edgestream.export", "edgestream.export.cli"}, \
        report["export_loaded"]


def test_blocker_really_blocks() -> None:
    """The check above is only worth something if the blocker refuses a real import."""
    code = SCRIPT.split("sys.meta_path.insert(0, Blocker())")[0] + (
        "\nsys.meta_path.insert(0, Blocker())\n"
        "try:\n    import onnx\nexcept ImportError:\n    print('blocked', attempts)\n"
        "else:\n    print('imported')\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(BLOCKED)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "blocked ['onnx']"
