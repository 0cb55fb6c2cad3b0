"""Greedy choices come from the graphs' head in every greedy path (issue 8): the K-token block pass
returns its K ids and log-probabilities, and Whisper's timestamp rules run in the head, fed the
small history they need (`timestamp_state`). Tokens must equal the logits path (`keep_logits`,
which chooses on the host) and transformers (`generate` with its timestamp logits processor);
with `execution=bound` the logits are fetched only where really needed (the no-speech probe)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from conftest import speech_dir
from edgestream.runtime.audio.wav import read_wav, to_mono
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.device_state import StepOutputs
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.session import SessionConfig

NO_LOOP_GUARD = 10**6


def _engine(bundle: Path, execution: str) -> WhisperEngine:
    return WhisperEngine(Bundle.open(bundle, SessionConfig("cpu", 1, execution=execution)))


def _audio(name: str = "arctic_a0009.wav") -> np.ndarray:
    return to_mono(read_wav(speech_dir() / name).samples)


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the step outputs copied to the host, in order."""
    names: list[str] = []
    host, host_row = StepOutputs.host, StepOutputs.host_row

    def counted_host(self: StepOutputs, name: str) -> np.ndarray:
        names.append(name)
        return host(self, name)

    def counted_row(self: StepOutputs, name: str, row: int) -> np.ndarray:
        names.append(f"{name}[row]")
        return host_row(self, name, row)

    monkeypatch.setattr(StepOutputs, "host", counted_host)
    monkeypatch.setattr(StepOutputs, "host_row", counted_row)
    yield names


def _logit_fetches(names: list[str]) -> int:
    return sum(n.startswith("logits") for n in names)


def _transformers_timestamps(model_dir: Path, engine: WhisperEngine, audio: np.ndarray,
                             max_new: int) -> list[int]:
    """transformers `generate` with timestamps (its WhisperTimeStampLogitsProcessor), greedy:
    the generated tokens without the end token. The random model's generation config lacks
    `max_initial_timestamp_index`; it is set to Whisper's 50 (1.0 s), the rule the head uses."""
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    model.generation_config.max_initial_timestamp_index = 50
    features = torch.from_numpy(engine.mel(audio)[None])
    with torch.no_grad():  # `generate` seeks on after its first pass: that pass is the decode
        out = model.generate(features, return_timestamps=True, do_sample=False, num_beams=1,
                             max_new_tokens=max_new, return_segments=True,
                             return_dict_in_generate=True)
    seq = out["segments"][0][0]["result"]["sequences"].tolist()
    if engine.sot in seq:
        seq = seq[seq.index(engine.sot) + 1:]
    return seq[: seq.index(engine.eot)] if engine.eot in seq else seq


@pytest.mark.parametrize("execution", ["host", "bound"])
def test_timestamp_head_equals_logits_path_and_transformers(
        tiny_bundle: Path, tiny_whisper_dir: Path, execution: str, fetched: list[str]) -> None:
    engine = _engine(tiny_bundle, execution)
    assert engine.has_timestamp_head
    assert engine.decoder.spec.input("timestamp_state").shape == (1, "tokens", 2)
    assert engine.decoder.spec.output("choice").shape == (1, "tokens", 3)
    audio = _audio()
    engine.encode(audio)
    fetched.clear()
    fast = engine.decode(timestamps=True, max_new=40, max_repeats=NO_LOOP_GUARD)
    # the probe's logits (the prompt's one row), then only choices
    assert _logit_fetches(fetched) == 1 and "choice" in fetched, fetched
    slow = engine.decode(timestamps=True, max_new=40, max_repeats=NO_LOOP_GUARD,
                         keep_logits=True)
    stamps = [t for t in fast.tokens if t >= engine.timestamp_begin]
    assert len(fast.tokens) >= 20 and len(stamps) >= 4  # the rules were exercised
    assert fast.tokens == slow.tokens
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, rtol=1e-4, atol=1e-4)
    expected = _transformers_timestamps(tiny_whisper_dir, engine, audio, 40)
    assert list(fast.tokens) == expected[: len(fast.tokens)]
    # a previous hypothesis re-scored in block passes: the block rows' choices under the
    # timestamp rules, kept while they agree; a wrong hint only costs steps
    for hint in (fast.tokens, fast.tokens[:10] + (fast.tokens[10] + 1,) + fast.tokens[11:]):
        fetched.clear()
        again = engine.decode(timestamps=True, max_new=40, max_repeats=NO_LOOP_GUARD, hint=hint)
        assert again.tokens == fast.tokens
        np.testing.assert_allclose(again.logprobs, fast.logprobs, rtol=1e-4, atol=1e-4)
        assert _logit_fetches(fetched) == 1 and "choice" in fetched, fetched


@pytest.mark.parametrize("execution", ["host", "bound"])
def test_block_choices_equal_logits_path(tiny_bundle: Path, execution: str,
                                         fetched: list[str]) -> None:
    """Without timestamps: a re-scored hint (right, or wrong from token 5 on) and a forced
    prefix give the plain logits path's tokens; block rows are read as choices."""
    engine = _engine(tiny_bundle, execution)
    engine.encode(_audio())
    slow = engine.decode(max_new=30, max_repeats=NO_LOOP_GUARD, keep_logits=True)
    assert len(slow.tokens) >= 20
    wrong = slow.tokens[:5] + tuple(t + 1 for t in slow.tokens[5:])
    for hint in (slow.tokens, wrong):
        fetched.clear()
        fast = engine.decode(max_new=30, max_repeats=NO_LOOP_GUARD, hint=hint)
        assert fast.tokens == slow.tokens
        np.testing.assert_allclose(fast.logprobs, slow.logprobs, rtol=1e-4, atol=1e-5)
        assert _logit_fetches(fetched) == 1 and "choice" in fetched, fetched  # the probe only
    forced = slow.tokens[:3]
    a = engine.decode(forced, max_new=20, max_repeats=NO_LOOP_GUARD, hint=slow.tokens[3:])
    b = engine.decode(forced, max_new=20, max_repeats=NO_LOOP_GUARD, keep_logits=True)
    assert a.tokens == b.tokens == slow.tokens[3: 3 + len(a.tokens)]
    # the no-speech probe still sees the prompt's logits
    assert engine.no_speech_probability(a) == pytest.approx(engine.no_speech_probability(b),
                                                            rel=1e-4)


def test_moonshine_block_choices_equal_logits_path(tiny_moonshine_bundle: Path,
                                                   fetched: list[str]) -> None:
    from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine

    engine = StreamingEncDecEngine(Bundle.open(tiny_moonshine_bundle,
                                               SessionConfig("cpu", 1, execution="bound")))
    audio = _audio("arctic_a0007.wav")
    for i in range(0, audio.size - engine.chunk, engine.chunk):
        engine.push(audio[i: i + engine.chunk])
    engine.has_head = False
    slow = engine.decode(40, NO_LOOP_GUARD)
    slow_n = engine.decode(30, NO_LOOP_GUARD, stop_at_eos=False)
    engine.has_head = True
    assert len(slow.tokens) >= 10
    for hint in (slow.tokens, slow.tokens[:4] + tuple((t + 1) % 40 + 4 for t in slow.tokens[4:])):
        fetched.clear()
        fast = engine.decode(40, NO_LOOP_GUARD, hint=hint)
        assert fast.tokens == slow.tokens
        np.testing.assert_allclose(fast.logprobs, slow.logprobs, rtol=1e-4, atol=1e-5)
        assert fetched and all(n in ("choice", "choice_logprob") for n in fetched), fetched
    fast_n = engine.decode(30, NO_LOOP_GUARD, stop_at_eos=False, hint=slow_n.tokens)
    assert fast_n.tokens == slow_n.tokens and len(fast_n.tokens) == 30
