"""Every file of a bundle is hashed in the manifest (graphs, their external data, the tokenizer),
and a graph's weights may live in external data (graphs over 2 GB); the decoder's symbolic token
axis is declared with its sizes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgestream.export import onnx_export
from edgestream.export.build import ExportOptions, export_bundle
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.errors import BundleError
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.manifest import MANIFEST_NAME
from edgestream.runtime.session import SessionConfig

CPU = SessionConfig("cpu")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit(root: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads((root / MANIFEST_NAME).read_text())
    change(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def external_bundle(tiny_whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Whisper exported with a 10 kB external-data threshold: the path a >2 GB graph
    takes, at a size a test can afford."""
    out = tmp_path_factory.mktemp("external") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "EXTERNAL_THRESHOLD", 10_000)
        report = export_bundle(ExportOptions(str(tiny_whisper_dir), out, vad="none"))
    assert report["passed"]
    return out


def test_external_data_is_hashed_and_runs(external_bundle: Path, tiny_bundle: Path) -> None:
    data = json.loads((external_bundle / MANIFEST_NAME).read_text())
    for g in data["graphs"]:
        files = g["external_data"]
        assert [f["file"] for f in files] == [g["file"] + ".data"]
        assert files[0]["sha256"] == _sha(external_bundle / files[0]["file"])
        assert (external_bundle / g["file"]).stat().st_size < 2_000_000  # weights are outside
    assert data["tokenizer"]["sha256"] == _sha(external_bundle / "tokenizer.json")
    # the same numbers as the single-file bundle of the same model
    mel = np.random.default_rng(1).standard_normal((1, 80, 3000)).astype(np.float32)
    a = Bundle.open(external_bundle, CPU).sessions["encoder"].run({"mel": mel})
    b = Bundle.open(tiny_bundle, CPU).sessions["encoder"].run({"mel": mel})
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)


def test_tampered_or_missing_external_data_is_refused(external_bundle: Path,
                                                      tmp_path: Path) -> None:
    root = Path(shutil.copytree(external_bundle, tmp_path / "b"))
    data = root / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data.*graphs\[decoder\]"
                                          r"\.external_data\[0\]\.sha256"):
        Bundle.open(root, CPU)
    data.unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data.*missing"):
        Bundle.open(root, CPU)


def test_tampered_tokenizer_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    tok = root / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|endoftext|>"', '"<|endoftext!|>"', 1))
    with pytest.raises(BundleError, match=r"tokenizer\.json.*tokenizer\.sha256"):
        Bundle.open(root, CPU)


def test_symbolic_axis_must_be_declared(tiny_bundle: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))

    def undeclare(d: dict) -> None:
        next(g for g in d["graphs"] if g["name"] == "decoder").pop("dims")

    _edit(root, undeclare)
    with pytest.raises(BundleError, match=r"graphs\[1\]\.inputs\[0\]\.shape.*'tokens'"):
        Bundle.open(root, CPU)


def test_one_graph_serves_step_and_block(tiny_bundle: Path) -> None:
    """The engine's step and block run the same session: the bundle has one decoder, and its K
    block and K single steps give the same logits (the engine's re-scoring relies on it)."""
    engine = WhisperEngine(Bundle.open(tiny_bundle, CPU))
    assert engine.decoder_block is engine.decoder and engine.block_size == 16
    engine.encode(np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.1)
    seq = [*engine.prompt, 440, 1332, 995, 13]
    block = engine.block(seq + [0] * (16 - len(seq)), 0)[: len(seq)]
    steps = np.stack([engine.step(t, i) for i, t in enumerate(seq)])
    np.testing.assert_allclose(block, steps, atol=1e-4)


def test_english_only_bundle_refuses_other_languages(tiny_bundle: Path) -> None:
    import numpy as np

    from edgestream.runtime import load
    from edgestream.runtime.errors import OptionError

    model = load(tiny_bundle, provider="cpu")
    with pytest.raises(OptionError, match="English-only"):
        model.transcribe(np.zeros(16000, np.float32), 16000, language="de")
    with pytest.raises(OptionError, match="English-only"):
        model.stream(task="translate")
    model.stream(language="en")  # the one language it has
