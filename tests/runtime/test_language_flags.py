"""--language / --task on an English-only bundle: refused before any output, exit code 2, with
the reason and the way out named (a multilingual bundle serves them; see test_whisper_base.py
for the flags at work)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import speech_dir


@pytest.mark.parametrize("flags", [["--language", "de"], ["--task", "translate"]])
@pytest.mark.parametrize("command", ["transcribe", "run"])
def test_english_only_bundle_refuses_language_and_task(tiny_bundle: Path, command: str,
                                                       flags: list[str],
                                                       capsys: pytest.CaptureFixture) -> None:
    from edgestream.runtime import cli

    clip = str(speech_dir() / "beckett.wav")
    args = ([command, str(tiny_bundle), clip] if command == "transcribe" else
            [command, str(tiny_bundle), "--input", clip, "--vad", "energy"])
    assert cli.main([*args, "--provider", "cpu", *flags]) == 2
    out = capsys.readouterr()
    assert "English-only" in out.err and "builtin:whisper-base" in out.err, out.err
    assert out.out == ""


def test_english_bundle_takes_language_en(tiny_bundle: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    from edgestream.runtime import cli

    clip = str(speech_dir() / "arctic_a0007.wav")
    assert cli.main(["transcribe", str(tiny_bundle), clip, "--provider", "cpu"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["transcribe", str(tiny_bundle), clip, "--provider", "cpu",
                     "--language", "en", "--task", "transcribe"]) == 0
    assert capsys.readouterr().out == plain and plain.startswith(clip)
