"""Whisper parity: the shipped bundle, stepped token by token through the runtime's own sessions,
against the transformers model run on the whole input.

Per clip (its first window): the runtime's log-mel vs `WhisperFeatureExtractor`; greedy tokens of
both sides (the reference is a full forward per step with the same suppression rules); the
runtime's step logits vs one teacher-forced transformers forward over the whole sequence; and,
when the decoder runs at K tokens too, that sequence teacher-forced through it K tokens per
pass (its own StateStore, the last block padded and overhanging as the runtime may do) against the
same forward at every position.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from edgestream.runtime.bundle import Bundle
from edgestream.runtime.session import GraphSession, SessionConfig
from edgestream.runtime.state import StateStore
from edgestream.runtime.audio.wav import read_wav, to_mono
from edgestream.runtime.families.whisper.engine import WhisperEngine

log = logging.getLogger(__name__)

LOGIT_TOLERANCE = 1e-3
MEL_TOLERANCE = 1e-4


def _reference_greedy(model: WhisperForConditionalGeneration, features: torch.Tensor,
                      engine: WhisperEngine, max_new: int) -> list[int]:
    prompt = list(engine.prompt)
    enc = model.model.encoder(input_features=features).last_hidden_state
    tokens: list[int] = []
    for _ in range(max_new):
        ids = torch.tensor([prompt + tokens])
        logits = model(encoder_outputs=(enc,), decoder_input_ids=ids).logits[0, -1].numpy().copy()
        if engine._suppress.size:
            logits[engine._suppress] = -np.inf
        if not tokens and engine._suppress_begin.size:
            logits[engine._suppress_begin] = -np.inf
        if engine.timestamp_begin:
            logits[engine.timestamp_begin:] = -np.inf
        token = int(np.argmax(logits))
        if token == engine.eot:
            break
        tokens.append(token)
    return tokens


def block_logits(block: GraphSession, k: int, store: StateStore, seq: list[int], pad: int
                 ) -> np.ndarray:
    """Teacher-force `seq` through the decoder from position 0, K tokens per pass, writing its
    rows through `store`; returns the logits of every position `[len(seq), vocab]`.
    The last block is padded with `pad`; its rows past `seq` are never read."""
    out: list[np.ndarray] = []
    for start in range(0, len(seq), k):
        chunk = seq[start:start + k]
        feeds = store.feeds(block.spec.name)
        feeds["tokens"] = np.array([chunk + [pad] * (k - len(chunk))], dtype=np.int64)
        feeds["position"] = np.array([start], dtype=np.int64)
        if block.spec.input("timestamp_state") is not None:  # only the head's column 2 reads it
            feeds["timestamp_state"] = np.zeros((1, k, 2), dtype=np.int64)
        outs = block.run(feeds)
        store.update(block.spec.name, outs, start)
        out.append(outs["logits"].reshape(k, -1)[:len(chunk)])
    return np.concatenate(out)


def check_whisper_parity(model: WhisperForConditionalGeneration, bundle_dir: Path,
                         clips: list[Path], max_new: int = 96) -> dict:
    """Compare bundle and model on `clips`; returns a report with `passed`."""
    engine = WhisperEngine(Bundle.open(bundle_dir, SessionConfig(provider="cpu")))
    block = engine.decoder_block
    extractor = WhisperFeatureExtractor(feature_size=engine.mel.n_mels)
    window = engine.bundle.manifest.audio.window_samples
    max_new = min(max_new, engine.t_max - len(engine.prompt) - 1)
    report: dict = {"clips": [], "logit_tolerance": LOGIT_TOLERANCE, "mel_tolerance": MEL_TOLERANCE}
    for clip in clips:
        audio = to_mono(read_wav(clip).samples)[:window]
        ref_mel = extractor(audio, sampling_rate=16000, return_tensors="np").input_features
        mel_diff = float(np.abs(engine.mel(audio) - ref_mel[0]).max())
        features = torch.from_numpy(ref_mel)
        with torch.no_grad():
            ref_tokens = _reference_greedy(model, features, engine, max_new)
            engine.encode(audio)
            # no loop guard here: parity compares raw greedy decoding on both sides
            ours = engine.decode(max_new=max_new, keep_logits=True, max_repeats=max_new)
            seq = list(engine.prompt) + ref_tokens
            full = model(input_features=features, decoder_input_ids=torch.tensor([seq])).logits[0]
        p = len(engine.prompt) - 1
        steps = min(len(ours.logits), len(ref_tokens) + 1)
        ref_steps = full[p: p + steps].numpy()
        logit_diff = float(np.abs(np.stack(ours.logits[:steps]) - ref_steps).max())
        entry = {"clip": clip.name, "tokens": len(ref_tokens),
                 "identical_tokens": list(ours.tokens) == ref_tokens,
                 "max_logit_diff": logit_diff, "max_mel_diff": mel_diff}
        if block is not None:
            store = StateStore(engine.bundle.manifest)
            store.update("encoder", engine.encoder.run({engine.encoder.spec.inputs[0].name:
                                                        engine.mel(audio)[None]}))
            ours_block = block_logits(block, engine.block_size, store, seq, engine.eot)
            entry["max_block_logit_diff"] = float(np.abs(ours_block - full.numpy()).max())
        report["clips"].append(entry)
    report["max_logit_diff"] = max(c["max_logit_diff"] for c in report["clips"])
    report["max_mel_diff"] = max(c["max_mel_diff"] for c in report["clips"])
    report["identical_clips"] = sum(c["identical_tokens"] for c in report["clips"])
    report["max_block_logit_diff"] = (max(c["max_block_logit_diff"] for c in report["clips"])
                                      if block is not None else None)
    report["passed"] = (report["identical_clips"] == len(clips)
                        and report["max_logit_diff"] <= LOGIT_TOLERANCE
                        and report["max_mel_diff"] <= MEL_TOLERANCE
                        and (block is None or report["max_block_logit_diff"] <= LOGIT_TOLERANCE))
    return report
