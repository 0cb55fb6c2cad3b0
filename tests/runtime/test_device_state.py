"""Device-resident state (IO binding, runtime/device_state.py) against the host path, on the CPU
provider: same tokens, bit-identical logits and state, on Whisper (steps, blocks, encoder-written
cross K/V) and Moonshine Streaming (ping-pong encoder state, row-selected memory appends,
snapshot/restore, reset). The bound Whisper logits are also checked against transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import speech_dir
from edgestream.runtime import load
from edgestream.runtime.audio.wav import read_wav, to_mono
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.device_state import BoundStates, HostStates
from edgestream.runtime.errors import OptionError
from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.session import SessionConfig

NO_LOOP_GUARD = 10**6


def _clip(name: str = "arctic_a0007.wav") -> np.ndarray:
    return to_mono(read_wav(speech_dir() / name).samples)


def _whisper(bundle: Path, execution: str) -> WhisperEngine:
    return WhisperEngine(Bundle.open(bundle, SessionConfig("cpu", 1, execution=execution)))


def test_whisper_bound_equals_host(tiny_bundle: Path) -> None:
    host, bound = _whisper(tiny_bundle, "host"), _whisper(tiny_bundle, "bound")
    assert isinstance(host.states, HostStates) and isinstance(bound.states, BoundStates)
    assert host.block_size > 1  # the block graph (tokens = K) is exercised too
    audio = _clip()
    for engine in (host, bound):
        engine.encode(audio)
    for name in host.states.buffers:  # the cross K/V the encoder wrote into bound buffers
        assert np.array_equal(host.states.buffers[name], bound.states.value(name)), name
    a = host.decode(max_new=30, max_repeats=NO_LOOP_GUARD, keep_logits=True)
    b = bound.decode(max_new=30, max_repeats=NO_LOOP_GUARD, keep_logits=True)
    assert len(a.tokens) >= 10 and a.tokens == b.tokens and a.logprobs == b.logprobs
    for x, y in zip(a.logits, b.logits):
        assert np.array_equal(x, y)
    for name in host.states.buffers:  # every state, self K/V rows included
        assert np.array_equal(host.states.buffers[name], bound.states.value(name)), name
    # re-scoring a hint in K-token block passes, then steps after a disagreement
    hint = list(a.tokens[:6]) + [(t + 1) % 50000 for t in a.tokens[6:]]
    c = host.decode(max_new=30, max_repeats=NO_LOOP_GUARD, hint=hint, keep_logits=True)
    d = bound.decode(max_new=30, max_repeats=NO_LOOP_GUARD, hint=hint, keep_logits=True)
    assert c.tokens == d.tokens == a.tokens
    assert all(np.array_equal(x, y) for x, y in zip(c.logits, d.logits))


def test_whisper_bound_logits_match_transformers(tiny_bundle: Path, tiny_whisper_dir: Path
                                                 ) -> None:
    """The bound path's logits at every chosen token equal the transformers forward on the same
    features and tokens (an independent implementation)."""
    import torch
    from transformers import WhisperForConditionalGeneration

    engine = _whisper(tiny_bundle, "bound")
    audio = _clip()
    engine.encode(audio)
    out = engine.decode(max_new=20, max_repeats=NO_LOOP_GUARD, keep_logits=True)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir).eval()
    prefix = list(engine.prompt)
    ids = torch.tensor([prefix + list(out.tokens)])
    features = torch.from_numpy(engine.mel(audio)[None])
    with torch.no_grad():
        ref = model(input_features=features, decoder_input_ids=ids).logits[0].numpy()
    for i, logits in enumerate(out.logits):
        np.testing.assert_allclose(logits, ref[len(prefix) - 1 + i], rtol=1e-4, atol=1e-4)


def _moonshine(bundle: Path, execution: str) -> StreamingEncDecEngine:
    return StreamingEncDecEngine(Bundle.open(bundle, SessionConfig("cpu", 1,
                                                                   execution=execution)))


def test_moonshine_bound_equals_host(tiny_moonshine_bundle: Path) -> None:
    host, bound = _moonshine(tiny_moonshine_bundle, "host"), \
        _moonshine(tiny_moonshine_bundle, "bound")
    assert isinstance(bound.states, BoundStates) and bound.states._pingpong
    audio = _clip()
    half = audio.size // 2 // host.chunk * host.chunk
    results = []
    for engine in (host, bound):
        for i in range(0, half, engine.chunk):
            engine.push(audio[i: i + engine.chunk])
        first = engine.decode(40, NO_LOOP_GUARD)
        saved = engine.snapshot()
        for i in range(half, audio.size - engine.chunk, engine.chunk):
            engine.push(audio[i: i + engine.chunk])
        engine.push(audio[audio.size - engine.chunk:], valid_frames=3)  # a partial chunk
        engine.flush()
        whole = engine.decode(40, NO_LOOP_GUARD)
        engine.restore(saved)  # back to the middle: the same continuation again
        for i in range(half, half + 4 * engine.chunk, engine.chunk):
            engine.push(audio[i: i + engine.chunk])
        again = engine.decode(40, NO_LOOP_GUARD)
        engine.reset()
        for i in range(0, 6 * engine.chunk, engine.chunk):
            engine.push(audio[i: i + engine.chunk])
        fresh = engine.decode(40, NO_LOOP_GUARD)
        results.append((first.tokens, whole.tokens, again.tokens, fresh.tokens,
                        engine.memory_length))
    assert results[0] == results[1]
    assert len(results[0][1]) >= 10
    for name in host.states.buffers:
        assert np.array_equal(host.states.buffers[name], bound.states.value(name)), name


def test_stream_stats_show_provider_and_graph_times(tiny_bundle: Path) -> None:
    model = load(tiny_bundle, provider="cpu", execution="bound")
    stream = model.stream()
    audio = _clip()
    for i in range(0, audio.size, 4000):
        stream.feed(audio[i: i + 4000], 16000)
    stream.finish()
    payload = stream.stats_event().values  # validated against the event schema (conftest)
    assert payload["execution"] == "bound"
    graphs = payload["graphs"]
    assert graphs["decoder"]["provider"] == "CPUExecutionProvider"
    assert graphs["decoder"]["sizes"]["1"]["runs"] > 0
    assert graphs["encoder"]["sizes"]["1"]["runs"] > 0


def test_execution_option_is_checked(tiny_bundle: Path) -> None:
    with pytest.raises(OptionError, match="execution='gpu'"):
        load(tiny_bundle, provider="cpu", execution="gpu")
    # auto on the CPU provider keeps the host path (no copies to gain)
    assert load(tiny_bundle, provider="cpu").stream().states.execution == "host"
