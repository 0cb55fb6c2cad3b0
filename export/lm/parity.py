"""LM parity: the shipped graph, stepped through the runtime's own engine, against transformers.

1. generate: for each fixed prompt, the chat pieces tokenized on the device equal the model's own
   `apply_chat_template`; 32 greedy tokens equal transformers `generate`; prompt logits agree.
2. pieces: the user text fed word by word (with hold-back and rollback) leaves exactly the
   whole-prompt tokens and the same logits.
3. ring: a sequence longer than the KV slots (sinks + sliding window, wrapping) against
   transformers' forward with the same explicit 4-D mask; perplexity after the wrap, ring vs full
   attention.
4. rollback: prefill A, speculate (B + a few greedy tokens), roll back, prefill C: the logits
   equal transformers' forward over A + C.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgestream.export.lm.chat import render_conversation
from edgestream.runtime.responder.engine import LMEngine
from edgestream.runtime.responder.lm import LanguageModel, load_lm
from edgestream.runtime.responder.prefill import IncrementalPrefill

log = logging.getLogger(__name__)

LOGIT_TOLERANCE = 1e-3
NEW_TOKENS = 32
SINKS = 4
SYSTEM = "You are a helpful voice assistant. Answer briefly."
PROMPTS = ("What is the capital of France?",
           "Tell me a short story about a robot who learns to paint.",
           "How do I boil an egg?")
# a plain passage for the ring-wrap check and perplexity (written for this project)
PASSAGE = ("The harbour woke slowly. Gulls circled the fishing boats while the first ferry of "
           "the day pulled away from the pier, its engine humming under the voices of early "
           "travellers. A baker on the corner opened her shutters and set out trays of bread, "
           "and the smell drifted down to the water where two children were throwing stones. "
           "By nine the market was full: apples and pears in wooden crates, cheese wrapped in "
           "paper, flowers in buckets of cold water. An old man played the accordion by the "
           "fountain and a dog lay asleep at his feet. Nobody was in a hurry. The ferry came "
           "back at noon, and the gulls followed it in, calling as if they had missed it.")


def _hf_logits(model: Any, ids: list[int], mask: torch.Tensor | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {"attention_mask": mask} if mask is not None else {}
        return model(torch.tensor([ids]), **kwargs).logits[0].float().numpy()


def _window_mask(n: int, sinks: int, window: int) -> torch.Tensor:
    """Additive 4-D mask: query q sees key k <= q when k < sinks or k > q - window."""
    q = torch.arange(n).view(-1, 1)
    k = torch.arange(n).view(1, -1)
    ok = (k <= q) & ((k < sinks) | (k > q - window))
    return torch.where(ok, 0.0, torch.finfo(torch.float32).min).view(1, 1, n, n)


def _check_generate(model: Any, tok: Any, lm: LanguageModel, report: dict) -> None:
    rows = []
    for prompt in PROMPTS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        ref_ids = list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               enable_thinking=False, return_dict=False))
        ids = lm.encode(render_conversation(lm.spec.chat, SYSTEM, [], prompt))
        with torch.no_grad():
            out = model.generate(torch.tensor([ref_ids]), attention_mask=torch.ones(
                1, len(ref_ids), dtype=torch.long), max_new_tokens=NEW_TOKENS, do_sample=False,
                pad_token_id=lm.spec.pad)[0, len(ref_ids):].tolist()
        ref = []
        for t in out:
            if t in lm.spec.stop:
                break
            ref.append(t)
        engine = LMEngine(lm)
        logits = engine.feed(ids, all_logits=True)
        ours = engine.greedy(logits[-1], NEW_TOKENS)
        diff = float(np.abs(logits - _hf_logits(model, ref_ids)).max())
        rows.append({"prompt": prompt, "template_tokens_identical": ids == ref_ids,
                     "tokens": len(ref), "identical_tokens": ours == ref,
                     "max_logit_diff": diff})
    report["generate"] = rows


def _check_pieces(model: Any, lm: LanguageModel, report: dict) -> None:
    prompt = PROMPTS[1]
    head = render_conversation(lm.spec.chat, SYSTEM, [], "")[: -len(lm.spec.chat["after_user"])]
    whole = lm.encode(head + prompt + lm.spec.chat["after_user"])
    engine = LMEngine(lm)
    reader = IncrementalPrefill(engine, head)
    words = prompt.split(" ")
    for i in range(1, len(words) + 1):
        reader.update(" ".join(words[:i]))
    # a revision: the last word heard differently, then corrected
    reader.update(" ".join(words[:-1] + ["pain"]))
    last = reader.finish(prompt, lm.spec.chat["after_user"])
    ref = _hf_logits(model, whole)[-1]
    report["pieces"] = {"identical_tokens": engine.tokens == whole,
                        "rollbacks": reader.rollbacks,
                        "max_logit_diff": float(np.abs(last - ref).max())}


def feed_mixed(engine: LMEngine, ids: list[int]) -> np.ndarray:
    """Logits of every position, `ids` fed as a conversation feeds them: a mix of K-token
    chunks and single steps."""
    parts, i, n = [], 0, 0
    while i < len(ids):
        size = engine.lm.spec.chunk_tokens if n % 3 else 1
        parts.append(engine.feed(ids[i:i + size], all_logits=True))
        i, n = i + size, n + 1
    return np.concatenate(parts)


def _check_ring(model: Any, lm: LanguageModel, report: dict) -> None:
    ids = lm.encode(PASSAGE)
    slots = lm.spec.kv_slots
    while len(ids) < slots + 3 * lm.spec.chunk_tokens:
        ids = ids + ids
    engine = LMEngine(lm, pinned=SINKS)
    window = engine.kv.window
    ours = feed_mixed(engine, ids)
    ref = _hf_logits(model, ids, _window_mask(len(ids), SINKS, window))
    full = _hf_logits(model, ids)
    after = slice(window, len(ids) - 1)

    def ppl(logits: np.ndarray) -> float:
        x = torch.from_numpy(logits[after])
        return math.exp(float(torch.nn.functional.cross_entropy(
            x, torch.tensor(ids[after.start + 1:]))))

    report["ring"] = {"tokens": len(ids), "kv_slots": slots, "sinks": SINKS, "window": window,
                      "max_logit_diff": float(np.abs(ours - ref).max()),
                      "identical_argmax": bool((ours.argmax(-1) == ref.argmax(-1)).all()),
                      "ppl_after_wrap": ppl(ours), "ppl_full_attention": ppl(full)}


def _check_rollback(model: Any, lm: LanguageModel, report: dict) -> None:
    a = lm.encode(render_conversation(lm.spec.chat, SYSTEM, [], "Tell me about"))
    b, c = lm.encode(" the weather today"), lm.encode(" the sea and its tides")
    engine = LMEngine(lm, margin=4 * lm.spec.chunk_tokens)
    engine.feed(a)
    mark = engine.mark()
    engine.greedy(engine.feed(b), 8)
    exact = engine.rollback(mark)
    ours = engine.feed(c, all_logits=True)
    # the window may be shorter than a + c (the compacting layout keeps slots free): the same
    # sink-less window mask for transformers
    ref = _hf_logits(model, a + c, _window_mask(len(a + c), 0, engine.kv.window))[len(a):]
    report["rollback"] = {"exact": exact, "max_logit_diff": float(np.abs(ours - ref).max())}


def check_lm_parity(model: Any, tok: Any, bundle_dir: Path) -> dict:
    """Run every check on the bundle in `bundle_dir`; returns a report with `passed`."""
    lm = load_lm(bundle_dir, provider="cpu")
    report: dict = {"logit_tolerance": LOGIT_TOLERANCE, "new_tokens": NEW_TOKENS}
    _check_generate(model, tok, lm, report)
    _check_pieces(model, lm, report)
    _check_ring(model, lm, report)
    _check_rollback(model, lm, report)
    gen = report["generate"]
    report["identical_prompts"] = sum(r["identical_tokens"] for r in gen)
    report["max_logit_diff"] = max([r["max_logit_diff"] for r in gen] + [
        report[k]["max_logit_diff"] for k in ("pieces", "ring", "rollback")])
    report["passed"] = (all(r["identical_tokens"] and r["template_tokens_identical"] for r in gen)
                        and report["pieces"]["identical_tokens"]
                        and report["ring"]["identical_argmax"] and report["rollback"]["exact"]
                        and report["max_logit_diff"] <= LOGIT_TOLERANCE)
    return report
