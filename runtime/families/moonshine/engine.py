"""A streaming encoder-decoder bundle (moonshine_streaming): every audio frame is encoded once.

The engine follows the protocol the recipe writes into `manifest.extra.protocol`: the encoder
steps one chunk at a time (its conv carries and per-layer histories are `replace` states), the
memory graph turns each real encoder frame into cross-attention K/V rows appended at the memory
length, and the decoder greedily decodes the current line over that memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgestream.runtime.bundle import Bundle
from edgestream.runtime.errors import BundleError
from edgestream.runtime.decode import (GreedyResult, HeadRows, block_graph, greedy_decode,
                                       pick)
from edgestream.runtime.session import GraphSession
from edgestream.runtime.device_state import make_states
from edgestream.runtime.families.whisper.engine import repeats_too_often

MODEL_GRAPHS = {"encoder", "memory", "decoder", "decoder_block"}


class StreamingEncDecEngine:
    """Encoder/memory stepping and greedy decoding for a `streaming_encoder_decoder` bundle."""

    def __init__(self, bundle: Bundle) -> None:
        m = bundle.manifest
        if m.pipeline != "streaming_encoder_decoder":
            raise BundleError(f"{bundle.root}: pipeline {m.pipeline!r} is not a streaming "
                              "encoder-decoder bundle")
        needed = ("chunk_frames", "frame_samples", "flush_chunks", "max_memory_frames",
                  "encoder_lookahead_frames")
        missing = [k for k in needed if k not in m.extra]
        if missing or "eos" not in m.tokenizer.special or not m.decoding.prompt:
            raise BundleError(f"{bundle.root}/manifest.json: extra.{missing or 'tokenizer'} "
                              "missing for a streaming encoder-decoder; re-export the bundle")
        self.bundle = bundle
        self.n = int(m.extra["chunk_frames"])
        self.frame_samples = int(m.extra["frame_samples"])
        self.chunk = m.audio.chunk_samples
        self.flush_chunks = int(m.extra["flush_chunks"])
        self.lookahead = int(m.extra["encoder_lookahead_frames"])
        self.m_max = int(m.extra["max_memory_frames"])
        self.prompt = tuple(m.decoding.prompt)
        self.eos = m.tokenizer.special["eos"]
        self.t_max = m.decoding.max_tokens
        self.encoder = bundle.sessions["encoder"]
        self.memory = bundle.sessions["memory"]
        self.decoder = bundle.sessions["decoder"]
        self.block_graph, self.block_size = block_graph(bundle, "token")
        self.decoder_block = bundle.sessions.get(self.block_graph) if self.block_size > 1 else None
        # state on the execution device (IO binding) or in host arrays: `execution`
        # bundles since issue 8: the decoder's greedy head returns the choice of each row
        self.has_head = self.decoder.spec.output("choice") is not None
        self.states = make_states(m, bundle.sessions, ["encoder", "memory", "decoder",
                                                       self.block_graph])
        self.tokenizer = bundle.tokenizer
        self.memory_length = 0
        self._positions = np.zeros((1, self.n), dtype=np.int64)

    def reset(self) -> None:
        """Start a new utterance: encoder carries, memory and caches back to zero."""
        self.states.reset(MODEL_GRAPHS)
        self.memory_length = 0

    def snapshot(self) -> tuple[dict[str, np.ndarray], int]:
        return self.states.snapshot(MODEL_GRAPHS), self.memory_length

    def restore(self, snapshot: tuple[dict[str, np.ndarray], int]) -> None:
        self.states.restore(snapshot[0])
        self.memory_length = snapshot[1]

    @property
    def room(self) -> int:
        """Memory rows still free, minus what a flush may still append."""
        return self.m_max - self.memory_length - self.lookahead

    def push(self, chunk: np.ndarray, valid_frames: int | None = None) -> int:
        """Encode one chunk (`chunk_samples` samples; `valid_frames` of its frames are real audio,
        the rest zero padding) and append its real frames to the memory; returns rows added."""
        valid = np.zeros((1, self.n), dtype=np.float32)
        valid[0, : self.n if valid_frames is None else valid_frames] = 1.0
        outs = self.states.run("encoder", {"audio": chunk.reshape(1, -1).astype(np.float32),
                                           "valid": valid})
        real = np.flatnonzero(outs.host("frames_valid")[0] > 0.5)[
            : self.m_max - self.memory_length]
        if real.size == 0:
            return 0
        self._positions[:] = 0
        self._positions[0, real] = np.arange(self.memory_length, self.memory_length + real.size)
        # the frames stay where the encoder wrote them; only the real rows are appended
        self.states.run("memory", {"frames": outs["frames"], "positions": self._positions},
                        position=self.memory_length, rows=real)
        self.memory_length += real.size
        return int(real.size)

    def flush(self) -> None:
        """End of utterance: zero chunks marked invalid release the frames held for lookahead."""
        silence = np.zeros(self.chunk, dtype=np.float32)
        for _ in range(self.flush_chunks):
            self.push(silence, valid_frames=0)

    def step(self, token: int, position: int) -> np.ndarray:
        return self._run(self.decoder, "decoder", [token], position)[0]

    def step_choice(self, token: int, position: int, column: int) -> tuple[int, float]:
        """One step through the greedy head (bundles since issue 8): (id, log-probability) with
        no rule (column 0) or the end token suppressed (column 1); only those leave the
        device."""
        out = self.states.run("decoder", {
            "token": np.array([[token]], dtype=np.int64),
            "position": np.array([position], dtype=np.int64),
            "memory_length": np.array([self.memory_length], dtype=np.int64)}, position)
        return (int(out.host("choice")[0, 0, column]),
                float(out.host("choice_logprob")[0, 0, column]))

    def block(self, tokens: Sequence[int], position: int) -> np.ndarray:
        return self._run(self.decoder_block, self.block_graph, tokens, position)

    def block_choices(self, tokens: Sequence[int], position: int, column: int) -> HeadRows:
        """One block pass read through the greedy head (`column` as in `step_choice`); the
        logits are copied only for a row that needs them."""
        out = self.states.run(self.block_graph, {
            "token": np.array([tokens], dtype=np.int64),
            "position": np.array([position], dtype=np.int64),
            "memory_length": np.array([self.memory_length], dtype=np.int64)}, position)
        return HeadRows(out, lambda row, generated: column)

    def _run(self, session: GraphSession, graph: str, tokens: Sequence[int],
             position: int) -> np.ndarray:
        out = self.states.run(graph, {
            "token": np.array([tokens], dtype=np.int64),
            "position": np.array([position], dtype=np.int64),
            "memory_length": np.array([self.memory_length], dtype=np.int64)}, position)
        return out.host("logits").reshape(len(tokens), -1)

    def decode(self, max_new: int, max_repeats: int = 4, hint: Sequence[int] = (),
               stop_at_eos: bool = True, temperature: float = 0.0, seed: int = 0,
               forced: Sequence[int] = ()) -> GreedyResult:
        """Greedy (or seeded sampled, for the quality fallback) tokens of the current line,
        without the start and end tokens. `hint`: the line's previous hypothesis, re-scored in
        block passes (same result, less compute). `forced`: text tokens fed after the prompt
        (the previous line, when the memory holds its audio as context). An n-gram repeated
        more than `max_repeats` times ends the decode (`looped`). `stop_at_eos=False` decodes
        exactly `max_new` tokens (benchmarks with random weights)."""
        if self.memory_length == 0:
            return GreedyResult((), True)
        prefix = (*self.prompt, *forced)
        limit = min(self.t_max, len(prefix) + max_new)
        if len(prefix) >= limit:
            return GreedyResult((), False)
        rng = np.random.default_rng(seed) if temperature > 0 else None

        def choose(logits: np.ndarray, generated: list[int]) -> tuple[int, float]:
            if not stop_at_eos:
                logits = logits.copy()
                logits[self.eos] = -np.inf
            return pick(logits, temperature, rng)

        head = block_head = None
        if self.has_head and rng is None:
            column = 0 if stop_at_eos else 1

            def head(token: int, position: int, generated: list[int]) -> tuple[int, float]:
                return self.step_choice(token, position, column)

            def block_head(tokens: Sequence[int], position: int,
                           histories: Sequence[list[int] | None]) -> HeadRows:
                return self.block_choices(tokens, position, column)

        return greedy_decode(self, prefix, choose, self.eos, limit,
                             lambda tokens: repeats_too_often(tokens, max_repeats), hint=hint,
                             head=head, block_head=block_head)

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens)).strip()
