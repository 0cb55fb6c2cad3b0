"""moonshine_streaming export: static step graphs, the state contract, and parity of the shipped
ONNX (stepped through the runtime's sessions, flush included) with the transformers forward."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edgestream.export.errors import ExportError
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.manifest import load_manifest, parse_manifest
from edgestream.runtime.state import StateStore

torch = pytest.importorskip("torch")

MAX_MEMORY, MAX_TOKENS = 640, 48
BLOCK = 16  # the recipe's default block size (the decoder's second token count)
SPEECH_CLIP = "two_cities.wav"


@pytest.fixture(scope="module")
def parts(tiny_moonshine_dir: Path):
    from edgestream.export.moonshine.recipe import load_moonshine
    from edgestream.export.sources import resolve

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    src = resolve(str(tiny_moonshine_dir))
    assert src.model_type == "moonshine_streaming"
    return load_moonshine(src)


@pytest.fixture(scope="module")
def bundles(parts, tmp_path_factory: pytest.TempPathFactory):
    """Exports on first use, one per (chunk_frames, window_semantics)."""
    from edgestream.export.moonshine.recipe import export_moonshine_graphs

    made: dict[tuple[int, str], Path] = {}

    def get(chunk_frames: int, semantics: str = "transformers") -> Path:
        if (chunk_frames, semantics) not in made:
            out = tmp_path_factory.mktemp(f"moonshine-{chunk_frames}-{semantics}")
            data = export_moonshine_graphs(parts, out, chunk_frames, semantics, MAX_MEMORY,
                                           MAX_TOKENS)
            parse_manifest(data)  # the checks the device runs
            (out / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
            made[chunk_frames, semantics] = out
        return made[chunk_frames, semantics]

    return get


@pytest.fixture(scope="module")
def random_audio() -> np.ndarray:
    # 1.5 s and a bit: not a whole number of chunks, so the last chunk is part real
    return (np.random.default_rng(0).standard_normal(24123) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    from conftest import speech_dir

    from edgestream.runtime.audio.wav import read_wav, to_mono

    wav = read_wav(speech_dir() / SPEECH_CLIP)
    return to_mono(wav.samples)[: 12 * wav.sample_rate].astype(np.float32)


def _assert_parity(report: dict, clips: int) -> None:
    assert report["passed"], json.dumps(report, indent=2)
    assert report["identical_clips"] == len(report["clips"]) == clips
    assert report["max_encoder_diff"] <= 1e-4 and report["max_logit_diff"] <= 1e-4
    assert report["max_block_logit_diff"] <= 1e-4  # the decoder at K tokens per pass
    for c in report["clips"]:
        assert c["streamed_frames"] == c["encoder_frames"]  # the flush released every frame
        assert c["tokens"] > 5


def test_bundle_contract(bundles) -> None:
    root = bundles(4)
    m = load_manifest(root)
    assert (m.family, m.pipeline) == ("moonshine_streaming", "streaming_encoder_decoder")
    assert [g.name for g in m.graphs] == ["encoder", "memory", "decoder"]
    enc = m.graph("encoder")
    assert enc.input("audio").shape == (1, 4 * 320) and enc.input("valid").shape == (1, 4)
    assert enc.output("frames").shape == (1, 4, 32)
    assert (m.audio.sample_rate, m.audio.chunk_samples, m.audio.frame_rate) == (16000, 1280, 50)
    # transformers' (16, 4) = 15 past + 3 future; (16, 0) = 15 past
    assert m.extra["attention_spans"] == [[15, 3], [15, 0], [15, 3]]
    assert m.extra["encoder_lookahead_frames"] == 6 and m.extra["flush_chunks"] == 2
    assert m.audio.lookahead_samples == 6 * 320
    assert m.extra["window_semantics"] == "transformers"
    states = {s.name: s for s in m.states}
    expected = {"conv1_carry": (1, 32, 4), "conv2_carry": (1, 64, 4),
                "hist_0": (1, 18, 32), "hist_valid_0": (1, 18), "hist_1": (1, 15, 32),
                "hist_valid_1": (1, 15), "hist_2": (1, 18, 32), "hist_valid_2": (1, 18)}
    for name, shape in expected.items():
        assert (states[name].shape, states[name].update, states[name].graph) == (
            shape, "replace", "encoder")
    for i in range(2):  # per layer, never stacked
        for t in "kv":
            cross, own = states[f"cross_{t}_{i}"], states[f"self_{t}_{i}"]
            assert (cross.graph, cross.output_graph, cross.update, cross.axis) == (
                "decoder", "memory", "append", 2)
            assert cross.shape == (1, 4, MAX_MEMORY, 10)
            assert m.graph("memory").output(cross.output).shape == (1, 4, 4, 10)
            assert (own.update, own.axis, own.shape) == ("append", 2, (1, 4, MAX_TOKENS, 10))
            # one graph at 1 or K tokens appends that many self rows
            assert m.graph("decoder").output(own.output).shape == (1, 4, "tokens", 10)
            assert not own.shared_with and not cross.shared_with
    assert len(m.states) == len(expected) + 8
    step = m.graph("decoder")
    assert m.extra["block_tokens"] == BLOCK and step.dims == {"tokens": (1, BLOCK)}
    assert [(t.name, t.shape) for t in step.inputs[:3]] == [
        ("token", (1, "tokens")), ("position", (1,)), ("memory_length", (1,))]
    assert step.output("logits").shape == (1, "tokens", 50)
    assert not list(root.glob("decoder_block*"))  # the decoder weights are stored once
    assert m.decoding.prompt == (1,) and m.tokenizer.special["eos"] == 2
    bundle = Bundle.open(root)
    store = StateStore(m)
    # the first chunks' outputs are all invalid (every key masked): finite, flagged 0
    outs = bundle.sessions["encoder"].run({"audio": np.zeros((1, 1280), np.float32),
                                           "valid": np.ones((1, 4), np.float32),
                                           **store.feeds("encoder")})
    assert np.isfinite(outs["frames"]).all() and not outs["frames_valid"].any()


@pytest.mark.parametrize("chunk_frames", [1, 4, 16])
def test_parity_random_audio(bundles, parts, random_audio, chunk_frames: int) -> None:
    from edgestream.export.moonshine.parity import check_moonshine_parity

    report = check_moonshine_parity(parts.model, bundles(chunk_frames), [random_audio],
                                    chunk_frames)
    _assert_parity(report, 1)


@pytest.mark.parametrize("chunk_frames", [1, 4, 16])
def test_parity_real_speech(bundles, parts, speech, chunk_frames: int) -> None:
    """12 s of a LibriVox reading, chunk by chunk and flushed."""
    from edgestream.export.moonshine.parity import check_moonshine_parity

    report = check_moonshine_parity(parts.model, bundles(chunk_frames), [speech], chunk_frames)
    _assert_parity(report, 1)
    assert report["clips"][0]["encoder_frames"] == 600


def test_inclusive_windows(bundles, parts, random_audio,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """"inclusive" reads (16, 4) as 16 past + 4 future: it matches transformers' forward under
    that mask, and not under transformers' own."""
    from edgestream.export.moonshine import parity as moonshine_parity

    root = bundles(4, "inclusive")
    m = load_manifest(root)
    assert m.extra["window_semantics"] == "inclusive"
    assert m.extra["attention_spans"] == [[16, 4], [16, 0], [16, 4]]
    assert m.extra["encoder_lookahead_frames"] == 8 and m.audio.lookahead_samples == 8 * 320
    assert {s.name: s.shape for s in m.states}["hist_1"] == (1, 16, 32)
    report = moonshine_parity.check_moonshine_parity(parts.model, root, [random_audio], 4)
    _assert_parity(report, 1)
    assert report["window_semantics"] == "inclusive"
    # the same bundle against transformers' default mask
    monkeypatch.setattr(moonshine_parity, "_inclusive_windows", contextlib.nullcontext)
    other = moonshine_parity.check_moonshine_parity(parts.model, root, [random_audio], 4)
    assert not other["passed"] and other["max_encoder_diff"] > 1e-2


@pytest.mark.parametrize("kwargs, field", [
    ({"chunk_frames": 0}, "chunk_frames"), ({"chunk_frames": 17}, "chunk_frames"),
    ({"window_semantics": "left"}, "window_semantics"),
    ({"max_memory_frames": 1025}, "max_memory_frames"), ({"max_tokens": 1}, "max_tokens"),
    ({"block_tokens": 1}, "block_tokens"), ({"block_tokens": -4}, "block_tokens")])
def test_bad_options_are_refused(parts, tmp_path: Path, kwargs: dict, field: str) -> None:
    from edgestream.export.moonshine.recipe import export_moonshine_graphs

    args = {"chunk_frames": 4, "window_semantics": "transformers", "max_memory_frames": 64,
            "max_tokens": 16, **kwargs}
    with pytest.raises(ExportError, match=field):
        export_moonshine_graphs(parts, tmp_path, **args)
    assert not list(tmp_path.iterdir())


def test_block_size_option(parts, tmp_path: Path) -> None:
    """block_tokens 0 declares the step only; a block longer than the cache is cut to
    max_tokens."""
    from edgestream.export.moonshine.recipe import export_moonshine_graphs

    (tmp_path / "none").mkdir()
    data = export_moonshine_graphs(parts, tmp_path / "none", 4, "transformers", 64, 16,
                                   block_tokens=0)
    m = parse_manifest(data)
    assert [g.name for g in m.graphs] == ["encoder", "memory", "decoder"]
    assert m.extra["block_tokens"] == 0 and m.graph("decoder").dims == {"tokens": (1,)}
    (tmp_path / "long").mkdir()
    m = parse_manifest(export_moonshine_graphs(parts, tmp_path / "long", 4, "transformers", 64, 8,
                                               block_tokens=32))
    assert m.graph("decoder").dims == {"tokens": (1, 8)}
    assert m.graph("decoder").output("logits").shape == (1, "tokens", 50)
