"""The Whisper decoder's greedy head (choice and log-probability in the graph): the same tokens as
the logits path and as transformers greedy with the same suppression rules, on the host and the
bound path; a bundle exported without the head (as before issue 8) still loads and decodes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import speech_dir
from edgestream.runtime.audio.wav import read_wav, to_mono
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.session import SessionConfig

NO_LOOP_GUARD = 10**6


def _engine(bundle: Path, execution: str = "host") -> WhisperEngine:
    return WhisperEngine(Bundle.open(bundle, SessionConfig("cpu", 1, execution=execution)))


def _reference(model_dir: Path, engine: WhisperEngine, audio: np.ndarray, max_new: int
               ) -> list[int]:
    """transformers greedy with the generation config's suppression, no timestamps."""
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    features = torch.from_numpy(engine.mel(audio)[None])
    prompt = list(engine.prompt)
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_features=features,
                           decoder_input_ids=torch.tensor([prompt + tokens])).logits[0, -1]
            logits = logits.numpy().copy()
            logits[list(model.generation_config.suppress_tokens)] = -np.inf
            if not tokens:
                logits[list(model.generation_config.begin_suppress_tokens)] = -np.inf
            logits[engine.timestamp_begin:] = -np.inf
            token = int(np.argmax(logits))
            if token == engine.eot:
                break
            tokens.append(token)
    return tokens


@pytest.mark.parametrize("execution", ["host", "bound"])
def test_head_tokens_equal_logits_path_and_transformers(tiny_bundle: Path, tiny_whisper_dir: Path,
                                                        execution: str) -> None:
    engine = _engine(tiny_bundle, execution)
    assert engine.has_head
    spec = engine.decoder.spec
    assert spec.output("choice").shape == (1, "tokens", 3)  # column 2: timestamp rules
    assert spec.output("choice").dtype == "int64"
    audio = to_mono(read_wav(speech_dir() / "arctic_a0009.wav").samples)
    engine.encode(audio)
    calls = {"head": 0}
    original = engine.step_choice

    def counted(*args):  # type: ignore[no-untyped-def]
        calls["head"] += 1
        return original(*args)

    engine.step_choice = counted  # type: ignore[method-assign]
    fast = engine.decode(max_new=25, max_repeats=NO_LOOP_GUARD)
    assert calls["head"] >= len(fast.tokens) - 1  # every single step went through the head
    slow = engine.decode(max_new=25, max_repeats=NO_LOOP_GUARD, keep_logits=True)
    assert len(fast.tokens) >= 10 and fast.tokens == slow.tokens
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, rtol=1e-4, atol=1e-5)
    assert list(fast.tokens) == _reference(tiny_whisper_dir, engine, audio, 25)[: len(fast.tokens)]


def test_bundle_without_head_still_decodes(tiny_whisper_dir: Path, tiny_bundle: Path,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    from edgestream.export.build import ExportOptions, export_bundle
    from edgestream.export.whisper import graphs

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    monkeypatch.setattr(graphs, "GREEDY_HEAD", False)
    old = tmp_path / "old"
    export_bundle(ExportOptions(str(tiny_whisper_dir), old, vad="none"))
    legacy, current = _engine(old, "bound"), _engine(tiny_bundle, "bound")
    assert not legacy.has_head and legacy.decoder.spec.output("choice") is None
    audio = to_mono(read_wav(speech_dir() / "arctic_a0009.wav").samples)
    for engine in (legacy, current):
        engine.encode(audio)
    a = legacy.decode(max_new=25, max_repeats=NO_LOOP_GUARD)
    b = current.decode(max_new=25, max_repeats=NO_LOOP_GUARD)
    assert a.tokens == b.tokens and len(a.tokens) >= 10


@pytest.mark.parametrize("execution", ["host", "bound"])
def test_moonshine_head_equals_logits_path(tiny_moonshine_bundle: Path, execution: str) -> None:
    """The Moonshine decoder's head gives the logits path's tokens (column 0), and with the end
    token suppressed exactly `max_new` tokens (column 1); transformers agreement of this path
    is checked end to end by test_moonshine_stream.py's finals."""
    from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine

    engine = StreamingEncDecEngine(Bundle.open(tiny_moonshine_bundle,
                                               SessionConfig("cpu", 1, execution=execution)))
    assert engine.has_head
    audio = to_mono(read_wav(speech_dir() / "arctic_a0007.wav").samples)
    for i in range(0, audio.size - engine.chunk, engine.chunk):
        engine.push(audio[i: i + engine.chunk])
    results = []
    for has_head in (True, False):
        engine.has_head = has_head
        results.append((engine.decode(40, NO_LOOP_GUARD),
                        engine.decode(30, NO_LOOP_GUARD, stop_at_eos=False)))
    (fast, fast_n), (slow, slow_n) = results
    assert len(fast.tokens) >= 10 and fast.tokens == slow.tokens
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, rtol=1e-4, atol=1e-5)
    assert fast_n.tokens == slow_n.tokens and len(fast_n.tokens) == 30
