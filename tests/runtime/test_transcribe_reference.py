"""`transcribe` decodes exactly what transformers' greedy Whisper decodes, window by window.

Every window that `transcribe` decodes on the repository's real clips is decoded again by
transformers `generate` (greedy, timestamps, the same previous-text prompt, transformers' own
feature extractor and suppression rules) on the same audio, and on the clips joined into one
long file, clean and with noise. Where no guard fired (no loop guard
override, no quality fallback, not judged silent) the tokens must be identical: our guards may
change a decode, nothing else may. The repetition clip is where the segment loop guard fires.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import references, speech_dir
from edgestream.runtime import load
from edgestream.runtime.audio.wav import read_wav, to_mono
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.families.whisper.transcribe import WindowDecode, transcribe_audio

pytestmark = pytest.mark.slow


def _reference_tokens(hf, features, previous: tuple[int, ...], sot_prev: int) -> list[int]:
    """transformers' greedy decode of one window: sampled tokens, without the end token.

    `generate` seeks on by itself when the text closes before the window ends (it then decodes
    the rest of the window again); its first pass is the decode of this window."""
    import torch

    kwargs = {"prompt_ids": torch.tensor([sot_prev, *previous])} if previous else {}
    with torch.no_grad():
        out = hf.generate(features, return_timestamps=True, do_sample=False, num_beams=1,
                          max_new_tokens=440 - len(previous), return_segments=True,
                          return_dict_in_generate=True, **kwargs)
    segments = out["segments"][0]
    if not segments:
        return []
    seq = segments[0]["result"]["sequences"].tolist()
    sot, eot = hf.generation_config.decoder_start_token_id, hf.generation_config.eos_token_id
    if sot in seq:  # the decoder prompt, when the result carries it
        seq = seq[len(seq) - seq[::-1].index(sot):]
    return seq[: seq.index(eot)] if eot in seq else seq


def _inputs() -> list[tuple[str, np.ndarray]]:
    """Each real clip; all of them back to back with 1 s pauses (windows that start mid-speech
    and carry previous text); and that long file with noise at 20 dB SNR."""
    clips = [(c, to_mono(read_wav(speech_dir() / c).samples)) for c in references()]
    pause = np.zeros(16000, np.float32)
    joined = np.concatenate([part for _, a in clips for part in (a, pause)])
    noise = np.random.default_rng(0).standard_normal(joined.size).astype(np.float32)
    noise *= np.sqrt(np.mean(joined ** 2) / np.mean(noise ** 2) / 10 ** (20 / 10))
    return clips + [("joined", joined), ("joined+noise", joined + noise)]


def test_unguarded_windows_equal_transformers_greedy(real_bundle: Path) -> None:
    from transformers import WhisperFeatureExtractor

    from edgestream.export.whisper.ct2 import builtin_folder, load_ct2_whisper

    hf, _ = load_ct2_whisper(builtin_folder("whisper-tiny.en"))
    hf.eval()
    features = WhisperFeatureExtractor(feature_size=hf.config.num_mel_bins)
    engine = WhisperEngine(load(real_bundle, provider="cpu").bundle)
    compared, guarded, mismatches = 0, 0, []
    for clip, audio in _inputs():
        windows: list[WindowDecode] = []
        transcribe_audio(engine, audio, record=windows)
        assert windows, clip
        for w in windows:
            if w.guarded or w.temperature > 0 or w.problems or w.silent:
                guarded += 1
                continue
            # the engine keeps at most 222 previous tokens; none of these clips needs more
            assert len(w.previous) <= 222, (clip, w.start)
            piece = audio[w.start: w.start + w.samples]
            feats = features(piece.astype(np.float32), sampling_rate=16000,
                             return_tensors="pt").input_features
            expected = _reference_tokens(hf, feats, w.previous, engine.sot_prev)
            compared += 1
            if list(w.tokens) != expected:
                mismatches.append((clip, w.start, list(w.tokens), expected))
    print(f"windows compared with transformers greedy: {compared}, guarded (skipped): {guarded}")
    assert not mismatches, mismatches
    assert compared >= 8, (compared, guarded)  # 9 of 12 on these inputs  # most windows are plain greedy decodes
    assert guarded >= 1  # the repetition clip makes the segment loop guard fire
