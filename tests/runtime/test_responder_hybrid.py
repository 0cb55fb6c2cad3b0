"""The responder on a hybrid LM (Gated DeltaNet + gated attention + MoE: a tiny random
qwen3_5_moe, saved as the vision + text checkpoint Intern-S2-Preview ships). Its linear-attention
state is rolled back by snapshot and re-feed, so every revision, discarded speculation and cut
reply goes through that path. Expected values come from transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lm_models import build_tiny_lm, export_tiny_lm

SYSTEM = "You are a test assistant."


@pytest.fixture(scope="module")
def hybrid_chat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, fp32 bundle with 256 KV slots)."""
    root = tmp_path_factory.mktemp("tiny-qwen3_5_moe-chat")
    folder = build_tiny_lm(root / "model", "qwen3_5_moe", seed=7, composite=True)
    export_tiny_lm(folder, root / "bundle", kv_slots=256)
    return folder, root / "bundle"


def _hf(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_revision_speculation_and_barge_in(hybrid_chat: tuple[Path, Path]) -> None:
    """Words read while the person speaks, a speculative reply started and discarded when they
    go on, the real reply cut after three tokens (barge-in), then a new turn: the tokens equal
    transformers' template over the conversation, and the logits its forward over them."""
    from edgestream.runtime.responder import load_lm
    from edgestream.runtime.responder.conversation import Conversation

    folder, bundle = hybrid_chat
    model, tok = _hf(folder)
    lm = load_lm(bundle, provider="cpu")
    conv = Conversation(lm, SYSTEM, 16)
    conv.read("Hello there")
    conv.begin_reply("Hello there")  # a pause: speculation starts ...
    spec = [conv.next_token() for _ in range(4)]
    assert all(t is not None for t in spec)
    conv.discard()
    conv.read("Hello there, robot")  # ... and the person went on
    conv.begin_reply("Hello there, robot")
    cut = [conv.next_token() for _ in range(3)]
    conv.close()  # barge-in: the three tokens stay
    conv.read("And now")
    logits = conv.reader.finish("And now?", lm.spec.chat["after_user"])
    ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "Hello there, robot"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        first = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                               pad_token_id=2)[0, len(ids):].tolist()
    assert cut == first
    ids += cut + tok.encode("<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n"
                            "<|im_start|>assistant\n", add_special_tokens=False)
    assert conv.engine.tokens == ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(logits - ref).max() < 1e-3
