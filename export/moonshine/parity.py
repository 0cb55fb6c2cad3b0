"""moonshine_streaming parity: the shipped bundle, stepped chunk by chunk (flush included) through
the runtime's own sessions and state store, against the transformers model run on the whole clip
with an attention mask (without one its encoder silently attends to everything).

Per clip: max abs diff of the real encoder frames; greedy tokens of the reference (a full forward
per step, argmax, until eos or `max_new`) against the bundle's argmax under teacher forcing (equal
at every step means the bundle's own greedy decode is the same sequence); max abs diff of the
bundle's step logits against one teacher-forced full forward; when the bundle has a
`decoder_block` graph, the same sequence teacher-forced through it K tokens per pass (fresh self
K/V, the streamed cross K/V; the last block padded) against that forward. A bundle exported with
`window_semantics` "inclusive" is compared with transformers' forward under the inclusive mask.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import MoonshineStreamingForConditionalGeneration
from transformers.models.moonshine_streaming import modeling_moonshine_streaming as hf

from edgestream.export.errors import ExportError
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.decode import block_graph
from edgestream.runtime.session import GraphSession, SessionConfig
from edgestream.runtime.state import StateStore
from edgestream.runtime.audio.wav import read_wav, to_mono

log = logging.getLogger(__name__)

TOLERANCE = 1e-4


@contextlib.contextmanager
def _inclusive_windows() -> Iterator[None]:
    """transformers' encoder mask read inclusively: (left, right) = left past, right future."""
    original = hf.sliding_window_mask_function

    def inclusive(window: tuple[int, int]):
        left, right = window

        def inner(batch_idx, head_idx, q_idx, kv_idx):
            dist = q_idx - kv_idx
            return ((dist >= 0) & (dist <= left)) | ((dist < 0) & (-dist <= right))

        return inner

    hf.sliding_window_mask_function = inclusive
    try:
        yield
    finally:
        hf.sliding_window_mask_function = original


def _load(clip: Path | np.ndarray, sample_rate: int, frame_len: int) -> tuple[str, np.ndarray]:
    if isinstance(clip, np.ndarray):
        name, audio = f"array[{clip.size}]", clip.astype(np.float32).reshape(-1)
    else:
        wav = read_wav(clip)
        if wav.sample_rate != sample_rate:
            raise ExportError(f"{clip}: {wav.sample_rate} Hz; parity clips must be "
                              f"{sample_rate} Hz")
        name, audio = Path(clip).name, to_mono(wav.samples).astype(np.float32)
    # transformers' embedder needs whole 5 ms frames
    return name, audio[: audio.size - audio.size % frame_len]


def _stream(bundle: Bundle, audio: np.ndarray, frames_real: int
            ) -> tuple[StateStore, np.ndarray, int]:
    """Run encoder + memory over `audio` and the flush; returns the store, the real encoder
    frames and the memory length."""
    m = bundle.manifest
    n, chunk = m.extra["chunk_frames"], m.audio.chunk_samples
    m_max = m.extra["max_memory_frames"]
    store = StateStore(m)
    chunks = -(-frames_real // n) + m.extra["flush_chunks"]
    padded = np.zeros(chunks * chunk, dtype=np.float32)
    padded[: audio.size] = audio
    frames, length = [], 0
    for c in range(chunks):
        valid = (np.arange(c * n, (c + 1) * n) < frames_real).astype(np.float32)[None]
        outs = bundle.sessions["encoder"].run(
            {"audio": padded[None, c * chunk:(c + 1) * chunk], "valid": valid,
             **store.feeds("encoder")})
        store.update("encoder", outs)
        real = np.flatnonzero(outs["frames_valid"][0] > 0.5)
        if real.size == 0:
            continue
        if length + real.size > m_max:
            raise ExportError(f"clip needs more than max_memory_frames={m_max} memory rows; "
                              "use a shorter parity clip")
        frames.append(outs["frames"][0, real])
        positions = np.zeros((1, n), dtype=np.int64)
        positions[0, real] = np.arange(length, length + real.size)
        rows = bundle.sessions["memory"].run({"frames": outs["frames"], "positions": positions})
        store.update("memory", {k: v[:, :, real] for k, v in rows.items()}, position=length)
        length += real.size
    ours = np.concatenate(frames) if frames else np.zeros((0, 0), np.float32)
    return store, ours, length


def _block_logits(block: GraphSession, k: int, store: StateStore, seq: list[int],
                  memory_length: int, pad: int) -> np.ndarray:
    """Teacher-force `seq` through the decoder from position 0, K tokens per pass, writing
    its rows through `store`; returns the logits of every position `[len(seq), vocab]`."""
    out: list[np.ndarray] = []
    for start in range(0, len(seq), k):
        chunk = seq[start:start + k]
        outs = block.run({"token": np.array([chunk + [pad] * (k - len(chunk))], np.int64),
                          "position": np.array([start], np.int64),
                          "memory_length": np.array([memory_length], np.int64),
                          **store.feeds(block.spec.name)})
        store.update(block.spec.name, outs, position=start)
        out.append(outs["logits"].reshape(k, -1)[:len(chunk)])
    return np.concatenate(out)


def _reference_greedy(model: MoonshineStreamingForConditionalGeneration, enc: torch.Tensor,
                      mask: torch.Tensor, start: int, eos: int, max_new: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(max_new):
        # the decoder adds pos_emb to the encoder states in place: give it a fresh copy each time
        outputs = hf.MoonshineStreamingEncoderModelOutput(last_hidden_state=enc.clone(),
                                                          attention_mask=mask)
        logits = model(encoder_outputs=outputs,
                       decoder_input_ids=torch.tensor([[start, *tokens]])).logits[0, -1]
        token = int(torch.argmax(logits))
        if token == eos:
            break
        tokens.append(token)
    return tokens


def check_moonshine_parity(model: MoonshineStreamingForConditionalGeneration, bundle_dir: Path,
                           clips: list[Path] | list[np.ndarray], chunk_frames: int | None = None,
                           max_new: int = 40) -> dict:
    """Compare the bundle at `bundle_dir` with `model` on `clips` (paths to 16 kHz WAV files or
    float32 sample arrays); returns a report with `passed`."""
    bundle = Bundle.open(bundle_dir, SessionConfig(provider="cpu"))
    m = bundle.manifest
    if chunk_frames is not None and chunk_frames != m.extra["chunk_frames"]:
        raise ExportError(f"{bundle_dir}: bundle has chunk_frames {m.extra['chunk_frames']}, "
                          f"parity was asked for {chunk_frames}")
    semantics = m.extra["window_semantics"]
    start, eos = m.decoding.prompt[0], m.tokenizer.special["eos"]
    max_new = min(max_new, m.decoding.max_tokens - 1)
    graph, k = block_graph(bundle, "token")
    block = bundle.sessions[graph] if k > 1 else None
    frame_len = model.model.encoder.embedder.frame_len
    report: dict = {"clips": [], "tolerance": TOLERANCE, "window_semantics": semantics,
                    "chunk_frames": m.extra["chunk_frames"]}
    windows = _inclusive_windows() if semantics == "inclusive" else contextlib.nullcontext()
    model.eval()
    with torch.no_grad(), windows:
        for clip in clips:
            name, audio = _load(clip, m.audio.sample_rate, frame_len)
            # a line never holds more than the memory: check the clip's first memory-full
            audio = audio[: m.extra["max_memory_frames"] * m.extra["frame_samples"]]
            values = torch.from_numpy(audio)[None]
            mask = torch.ones_like(values, dtype=torch.long)
            ref = model.model.encoder(values, attention_mask=mask)
            enc, enc_mask = ref.last_hidden_state, ref.attention_mask
            store, ours, length = _stream(bundle, audio, enc.shape[1])
            enc_diff = (float(np.abs(ours - enc[0].numpy()).max())
                        if ours.shape == tuple(enc.shape[1:]) else float("inf"))
            ref_tokens = _reference_greedy(model, enc, enc_mask, start, eos, max_new)
            seq = [start, *ref_tokens]
            full = model(values, attention_mask=mask,
                         decoder_input_ids=torch.tensor([seq])).logits[0].numpy()
            block_diff = None
            if block is not None:  # on a copy taken before the steps below write the self K/V
                copy = StateStore(m)
                copy.buffers.update({k: v.copy() for k, v in store.buffers.items()})
                ours_block = _block_logits(block, k, copy, seq, length, eos)
                block_diff = float(np.abs(ours_block - full).max())
            logits = []
            for pos, token in enumerate(seq):
                outs = bundle.sessions["decoder"].run(
                    {"token": np.array([[token]], np.int64), "position": np.array([pos], np.int64),
                     "memory_length": np.array([length], np.int64), **store.feeds("decoder")})
                store.update("decoder", outs, position=pos)
                logits.append(outs["logits"].reshape(-1, outs["logits"].shape[-1])[0])
            ours_logits = np.stack(logits)
            argmax = [int(t) for t in ours_logits.argmax(-1)]
            expected = ref_tokens + ([eos] if len(ref_tokens) < max_new else [])
            report["clips"].append({
                "clip": name, "seconds": round(audio.size / m.audio.sample_rate, 3),
                "encoder_frames": int(enc.shape[1]), "streamed_frames": int(ours.shape[0]),
                "tokens": len(ref_tokens),
                "identical_tokens": argmax[: len(expected)] == expected,
                "max_encoder_diff": enc_diff,
                "max_logit_diff": float(np.abs(ours_logits - full).max()),
                **({} if block_diff is None else {"max_block_logit_diff": block_diff})})
    clips_ = report["clips"]
    report["max_encoder_diff"] = max(c["max_encoder_diff"] for c in clips_)
    report["max_logit_diff"] = max(c["max_logit_diff"] for c in clips_)
    report["identical_clips"] = sum(c["identical_tokens"] for c in clips_)
    report["max_block_logit_diff"] = (max(c["max_block_logit_diff"] for c in clips_)
                                      if block is not None else None)
    report["passed"] = (report["identical_clips"] == len(clips_)
                        and report["max_encoder_diff"] <= TOLERANCE
                        and report["max_logit_diff"] <= TOLERANCE
                        and (block is None or report["max_block_logit_diff"] <= TOLERANCE))
    return report
