"""Whisper on a bundle: encode one window, greedy-decode with static KV, optional timestamps.

Used by both `transcribe` (whole files, window by window) and the LocalAgreement streaming driver.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgestream.runtime.bundle import Bundle
from edgestream.runtime.errors import BundleError
from edgestream.runtime.decode import GreedyResult, greedy_decode
from edgestream.runtime.families.whisper.mel import WhisperLogMel
from edgestream.runtime.state import StateStore

_NEG = np.float32(-np.inf)


def repeats_too_often(tokens: Sequence[int], max_repeats: int) -> bool:
    """True when the tail of `tokens` is one n-gram (n <= 8) repeated more than `max_repeats` times:
    the classic Whisper loop on silence or noise."""
    for n in range(1, 9):
        reps = max_repeats + 1
        if len(tokens) < n * reps:
            break
        tail = list(tokens[-n:])
        if all(list(tokens[len(tokens) - n * (r + 1): len(tokens) - n * r]) == tail
               for r in range(reps)):
            return True
    return False


class WhisperEngine:
    """Runs a whisper_window bundle: `encode(audio)` then `decode(...)`."""

    def __init__(self, bundle: Bundle) -> None:
        m = bundle.manifest
        if m.pipeline != "whisper_window":
            raise BundleError(f"{bundle.root}: pipeline {m.pipeline!r} is not a Whisper bundle")
        self.bundle = bundle
        self.encoder = bundle.sessions["encoder"]
        self.decoder = bundle.sessions["decoder"]
        self.decoder_block = bundle.sessions.get("decoder_block")
        self.block_size = (self.decoder_block.spec.input("tokens").shape[1]
                           if self.decoder_block else 1)
        mel_spec = self.encoder.spec.inputs[0]
        self.mel = WhisperLogMel(n_mels=mel_spec.shape[1], n_samples=m.audio.window_samples)
        self.states = StateStore(m)
        sp = m.tokenizer.special
        missing = {"sot", "eot"} - set(sp)
        if missing or not {"encoder", "decoder"} <= set(bundle.sessions):
            raise BundleError(f"{bundle.root}/manifest.json: a Whisper bundle needs graphs encoder "
                              f"and decoder and tokenizer.special sot and eot (missing: "
                              f"{sorted(missing) or 'graphs'}); re-export the bundle")
        self.eot = sp["eot"]
        self.timestamp_begin = sp.get("timestamp_begin", 0)
        self.no_timestamps = sp.get("no_timestamps", -1)
        self.vocab = self.decoder.spec.output("logits").shape[-1]
        self.t_max = m.decoding.max_tokens
        self._suppress = np.array(m.decoding.suppress, dtype=np.int64)
        self._suppress_begin = np.array(m.decoding.suppress_at_begin, dtype=np.int64)
        self.prompt = tuple(m.decoding.prompt)
        self.tokenizer = bundle.tokenizer

    @property
    def window_seconds(self) -> float:
        return self.bundle.manifest.audio.window_samples / self.bundle.manifest.audio.sample_rate

    def encode(self, audio: np.ndarray) -> None:
        """Compute the log-mel of up to one window of 16 kHz audio and fill the cross K/V."""
        mel = self.mel(audio)[None]
        self.states.update("encoder", self.encoder.run({self.encoder.spec.inputs[0].name: mel}))

    def step(self, token: int, position: int) -> np.ndarray:
        feeds = self.states.feeds("decoder")
        feeds["tokens"] = np.array([[token]], dtype=np.int64)
        feeds["position"] = np.array([position], dtype=np.int64)
        out = self.decoder.run(feeds)
        self.states.update("decoder", out, position)
        return out["logits"][0]

    def block(self, tokens: Sequence[int], position: int) -> np.ndarray:
        feeds = self.states.feeds("decoder_block")
        feeds["tokens"] = np.array([tokens], dtype=np.int64)
        feeds["position"] = np.array([position], dtype=np.int64)
        out = self.decoder_block.run(feeds)
        self.states.update("decoder_block", out, position)
        return out["logits"][0]

    def decode(self, forced: Sequence[int] = (), *, timestamps: bool = False,
               max_new: int | None = None, max_repeats: int = 4, hint: Sequence[int] = (),
               keep_logits: bool = False) -> GreedyResult:
        """Greedy decode after the prompt and the `forced` prefix (teacher-forced).

        Applies the suppression lists of the original generation config, Whisper's timestamp rules
        when `timestamps`, and stops on an n-gram loop (hallucination guard). `hint`: the previous
        hypothesis after `forced`, re-scored in block passes (same result, less compute).
        """
        prompt = list(self.prompt)
        if timestamps and prompt and prompt[-1] == self.no_timestamps:
            prompt = prompt[:-1]
        forced = list(forced)
        prefix = prompt + forced
        limit = self.t_max - 1 if max_new is None else min(self.t_max - 1, len(prefix) + max_new)
        if len(prefix) >= limit:
            return GreedyResult((), False)

        def choose(logits: np.ndarray, generated: list[int]) -> int:
            scores = logits.copy()
            if self._suppress.size:
                scores[self._suppress] = _NEG
            if not generated and not forced and self._suppress_begin.size:
                scores[self._suppress_begin] = _NEG
            if timestamps:
                self._timestamp_rules(scores, forced + generated)
            elif self.timestamp_begin:
                scores[self.timestamp_begin:] = _NEG
            return int(np.argmax(scores))

        return greedy_decode(self, prefix, choose, self.eot, limit,
                             lambda generated: repeats_too_often(generated, max_repeats),
                             hint=hint, keep_logits=keep_logits)

    def _timestamp_rules(self, scores: np.ndarray, seq: list[int]) -> None:
        """Whisper's timestamp grammar: timestamps come in pairs, never go backwards, start the
        text, and win when their total probability beats any single text token."""
        tb = self.timestamp_begin
        if self.no_timestamps >= 0:
            scores[self.no_timestamps] = _NEG
        last_ts = len(seq) >= 1 and seq[-1] >= tb
        penult_ts = len(seq) < 2 or seq[-2] >= tb
        if last_ts:
            if penult_ts:
                scores[tb:] = _NEG
            else:
                scores[: self.eot] = _NEG
        stamps = [t for t in seq if t >= tb]
        if stamps:
            # a closed pair may repeat its end as the next start; otherwise strictly increasing
            floor = stamps[-1] if (last_ts and not penult_ts) else stamps[-1] + 1
            scores[tb: min(floor, scores.size)] = _NEG
        if not seq:
            scores[: tb] = _NEG
            scores[tb + 51:] = _NEG  # first timestamp at most 1.0 s (50 steps of 20 ms)
        shifted = scores - scores.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        ts_mass = np.logaddexp.reduce(logprobs[tb:])
        if ts_mass > logprobs[:tb].max():
            scores[:tb] = _NEG

    def text_tokens(self, tokens: Sequence[int]) -> list[int]:
        return [t for t in tokens if t < self.eot]
