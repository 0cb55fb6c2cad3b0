"""The `edgestream` command line on bad input (exit code 2, a message on stderr naming the file,
field or device) and on good input (exit 0, the documented output format).

Most cases run the installed console script as a subprocess; the microphone cases call
`cli.main` in-process so the fake PortAudio installed with monkeypatch applies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from edgestream.runtime import cli

EDGESTREAM = Path(sys.executable).with_name("edgestream")
BECKETT = Path(cli.__file__).parent / "assets" / "beckett.wav"
CLIP_S = 3.0


def edgestream(*args: object, stdin: bytes | None = None, timeout: float = 300
               ) -> subprocess.CompletedProcess[str]:
    """Run the installed console script; stdout and stderr come back decoded as UTF-8."""
    if not EDGESTREAM.is_file():
        pytest.skip(f"console script not installed at {EDGESTREAM} (pip install -e .)")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([str(EDGESTREAM), *map(str, args)], capture_output=True,
                       input=stdin if stdin is not None else b"", env=env, timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8"),
                                       r.stderr.decode("utf-8", errors="replace"))


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def clip_pcm() -> np.ndarray:
    """The first CLIP_S seconds of the shipped demo clip as int16 (16 kHz mono)."""
    with wave.open(str(BECKETT), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return np.frombuffer(w.readframes(int(CLIP_S * 16000)), dtype="<i2")


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wav(tmp_path_factory.mktemp("clips") / "short.wav", clip_pcm())


def assert_error(r: subprocess.CompletedProcess[str], *names: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("edgestream: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for name in names:
        assert name in r.stderr, (name, r.stderr)
    return r.stderr


# Audio files given to `transcribe`.

def test_transcribe_missing_file(tiny_bundle: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    assert_error(edgestream("transcribe", tiny_bundle, BECKETT, missing), str(missing),
                 "no such")


@pytest.mark.parametrize("keep", ["half_of_data", "inside_header"])
def test_transcribe_truncated_wav(tiny_bundle: Path, tmp_path: Path, keep: str) -> None:
    path = write_wav(tmp_path / "cut.wav", (np.sin(np.arange(16000) / 10) * 8000))
    data = path.read_bytes()
    path.write_bytes(data[:44 + 16000] if keep == "half_of_data" else data[:30])
    err = assert_error(edgestream("transcribe", tiny_bundle, path), str(path))
    if keep == "half_of_data":
        assert "truncated" in err and "16000 frames" in err and "8000" in err


@pytest.mark.parametrize("content", [b"hello, this is not audio\n" * 20, b""],
                         ids=["text", "empty"])
def test_transcribe_non_audio_file(tiny_bundle: Path, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.wav"
    path.write_bytes(content)
    assert_error(edgestream("transcribe", tiny_bundle, path), str(path), "not a WAV file",
                 "ffmpeg")


def test_transcribe_checks_every_file_before_printing(tiny_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not audio\n")
    r = edgestream("transcribe", tiny_bundle, BECKETT, bad)
    assert_error(r, str(bad))
    assert r.stdout == ""


def test_transcribe_prints_one_line_per_file(tiny_bundle: Path, short_clip: Path) -> None:
    r = edgestream("transcribe", tiny_bundle, BECKETT, short_clip, "--provider", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    for line, f in zip(lines, (BECKETT, short_clip)):
        name, sep, text = line.partition("\t")
        assert (name, sep) == (str(f), "\t")
        assert "\t" not in text and "\n" not in text


# Bundle, provider and export errors.

def test_run_missing_bundle_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-bundle"
    assert_error(edgestream("run", missing, "--input", BECKETT), str(missing), "edgestream export")


def test_run_without_bundle(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run"]) == 2
    assert "BUNDLE" in capsys.readouterr().err


def test_run_missing_input_file(tiny_bundle: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone.wav"
    assert_error(edgestream("run", tiny_bundle, "--input", missing), str(missing), "--input mic")


@pytest.mark.parametrize("command", ["transcribe", "run"])
def test_cuda_provider_unavailable(tiny_bundle: Path, command: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the error path needs a CPU-only build")
    args = [command, str(tiny_bundle), *([str(BECKETT)] if command == "transcribe" else
                                         ["--input", str(BECKETT)]), "--provider", "cuda"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "CUDAExecutionProvider" in err and "onnxruntime-gpu" in err and "--provider cpu" in err


def test_export_of_nonexistent_source(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    r = edgestream("export", missing, "-o", tmp_path / "out")
    assert_error(r, str(missing))
    assert not (tmp_path / "out").exists()


def test_export_refuses_accuracy_gate_options_that_make_no_sense(tmp_path: Path) -> None:
    """Bad gate numbers are refused before any export work, each named with what to give."""
    r = edgestream("export", "builtin:whisper-tiny.en", "-o", tmp_path / "out", "--quantize",
                   "int8", "--eval-wer-copies", "-1", "--min-agreement", "1.5",
                   "--eval-windows", "0", "--wer-budget", "-2")
    err = assert_error(r, "--eval-wer-copies -1", "--min-agreement 1.5", "--eval-windows 0",
                       "--wer-budget -2.0")
    assert "whole number >= 0" in err and "share from 0 to 1" in err
    assert not (tmp_path / "out").exists()


def test_export_of_folder_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "empty-model"
    folder.mkdir()
    assert_error(edgestream("export", folder, "-o", tmp_path / "out"), str(folder), "config.json")


# Microphone selection, against a fake PortAudio under the real PyAudio classes.

@pytest.fixture
def fake_mics(monkeypatch: pytest.MonkeyPatch) -> object:
    pyaudio = pytest.importorskip("pyaudio", reason="pyaudio is not installed "
                                                    "(pip install 'edgestream[mic]')")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from fake_portaudio import usb_and_default
    finally:
        sys.path.remove(str(Path(__file__).resolve().parent))
    fake = usb_and_default()
    monkeypatch.setattr(pyaudio, "pa", fake)
    return fake


def test_run_unknown_mic_names_it_and_lists_devices(tiny_bundle: Path, fake_mics: object,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", str(tiny_bundle), "--input", "mic", "--device", "no-such-mic",
                     "--provider", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("edgestream: error: ")
    assert "'no-such-mic'" in err
    assert "USB PnP Sound Device: Audio (hw:1,0)" in err and "default" in err
    assert "HDMI" not in err  # output-only devices are not offered
    assert "--list-devices" in err


def test_run_list_devices(fake_mics: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--list-devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[1] USB PnP Sound Device") and "48000 Hz" in lines[0]
    assert lines[1].startswith("[2] default") and lines[1].endswith("(default)")


# Streaming: JSON lines from a file and from raw PCM on stdin.

def jsonl_events(r: subprocess.CompletedProcess[str]) -> list[dict]:
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["type"] == "ready" and events[-1]["type"] == "stats"
    assert [e["type"] for e in events].count("ready") == 1
    assert {e["type"] for e in events} <= {"ready", "speech_started", "partial", "final",
                                          "stats", "notice", "error"}
    assert not any(e["type"] == "error" for e in events)
    stats = events[-1]
    assert stats["chunks"] > 0 and stats["rtf"] > 0
    assert 0 < stats["step_ms_p50"] <= stats["step_ms_p95"] <= stats["step_ms_p99"]
    assert stats["audio_s"] == pytest.approx(CLIP_S, abs=0.01)
    return events


def test_run_file_jsonl(tiny_bundle: Path, short_clip: Path) -> None:
    events = jsonl_events(edgestream("run", tiny_bundle, "--input", short_clip, "--jsonl",
                                     "--provider", "cpu"))
    ready = events[0]
    assert ready["provider"] == "CPUExecutionProvider" and ready["sample_rate"] == 16000
    assert ready["family"] == "whisper" and ready["input"] == str(short_clip)


def test_run_stdin_pcm_jsonl(tiny_bundle: Path) -> None:
    pcm = clip_pcm().tobytes()
    events = jsonl_events(edgestream("run", tiny_bundle, "--input", "-", "--jsonl",
                                     "--vad", "energy", "--provider", "cpu", stdin=pcm))
    assert events[0]["input"] == "stdin (s16le)"


def test_run_stdin_zero_rate(tiny_bundle: Path) -> None:
    r = edgestream("run", tiny_bundle, "--input", "-", "--stdin-rate", "0", stdin=b"\0" * 3200)
    assert_error(r, "--stdin-rate")


def test_run_stdin_zero_channels(tiny_bundle: Path) -> None:
    r = edgestream("run", tiny_bundle, "--input", "-", "--stdin-channels", "0",
                   stdin=b"\0" * 3200)
    assert_error(r, "--stdin-channels")


def test_run_with_a_device_profile_and_bound_state(tiny_bundle: Path, short_clip: Path) -> None:
    """`--profile` and `--execution` reach the model: the closing stats event says the stream
    kept its state bound (IO binding) and the graphs ran on the profile's CPU provider."""
    events = jsonl_events(edgestream("run", tiny_bundle, "--input", short_clip, "--jsonl",
                                     "--profile", "cpu-x86_64", "--execution", "bound"))
    stats = [e for e in events if e["type"] == "stats"][-1]
    assert stats["execution"] == "bound", stats
    assert events[0]["provider"] == "CPUExecutionProvider"


def test_unknown_profile_is_named(tiny_bundle: Path, short_clip: Path) -> None:
    r = edgestream("transcribe", tiny_bundle, short_clip, "--profile", "no-such-board")
    assert_error(r, "no-such-board")
