"""The responder on real speech: Whisper tiny.en (real weights) recognizes the clips, a tiny
random llama answers. Expected replies come from transformers: its own chat template on the
finals the recognizer produced, and its own greedy `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import speech_dir
from edgestream.runtime.events.types import Final, Reply, ReplyEnd, to_json

SYSTEM = "You are a test assistant."


def _clip(name: str) -> tuple[np.ndarray, int]:
    from edgestream.runtime.audio.wav import read_wav, to_mono

    wav = read_wav(speech_dir() / name)
    return to_mono(wav.samples), wav.sample_rate


def _hf(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _reference_reply(folder: Path, messages: list[dict], max_new: int) -> list[int]:
    model, tok = _hf(folder)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=2)[0, len(ids):].tolist()
    return out[: out.index(2)] if 2 in out else out


def _run(real_bundle: Path, lm_bundle: Path, clips: list[str], **options) -> tuple[list, object]:
    from edgestream.runtime import load
    from edgestream.runtime.responder import load_lm
    from edgestream.runtime.responder.responder import Responder, ResponderOptions

    model = load(real_bundle, provider="cpu")
    lm = load_lm(lm_bundle, provider="cpu")
    r = Responder(model, lm, ResponderOptions(system_prompt=SYSTEM, **options))
    events = []
    for name in clips:
        audio, rate = _clip(name)
        silence = np.zeros(rate, np.float32)  # a second of silence: the endpoint
        for block in np.array_split(np.concatenate([audio, silence]), 40):
            events += r.feed(block, rate)
    events += r.finish()
    for e in events:
        json.loads(to_json(e))  # every event matches runtime/events/schema.json
    return events, r


@pytest.mark.parametrize("speculative", [True, False])
def test_reply_equals_transformers_generate(real_bundle: Path, tiny_chat_bundle: Path,
                                            tiny_llama_dir: Path, speculative: bool) -> None:
    events, r = _run(real_bundle, tiny_chat_bundle, ["arctic_a0007.wav"], threaded=False,
                     max_reply_tokens=12, speculative=speculative)
    finals = [e for e in events if isinstance(e, Final) and e.text]
    ends = [e for e in events if isinstance(e, ReplyEnd)]
    assert len(finals) == 1 and len(ends) == 1, events
    user = finals[0].text
    ref = _reference_reply(tiny_llama_dir, [{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": user.strip()}], 12)
    lm = r.lm
    assert ends[0].text == lm.decode(ref) and ends[0].reason in ("stop", "limit")
    replies = [e for e in events if isinstance(e, Reply)]
    assert replies and all(e.reply == 0 for e in replies) and replies[-1].text == ends[0].text
    if speculative:
        assert r.stream.gate.counters.speculative_used == 1
    assert len(r.first_reply_ms()) == 1


def test_two_turns_keep_the_conversation(real_bundle: Path, tiny_chat_bundle: Path,
                                         tiny_llama_dir: Path) -> None:
    """The second reply continues the conversation: transformers gets system, first turn, the
    first reply's own tokens and the second turn, built from its tokenizer and its template."""
    events, r = _run(real_bundle, tiny_chat_bundle, ["arctic_a0007.wav", "arctic_a0009.wav"],
                     threaded=False, max_reply_tokens=10)
    finals = [e.text.strip() for e in events if isinstance(e, Final) and e.text]
    ends = [e for e in events if isinstance(e, ReplyEnd)]
    assert len(finals) == 2 and [e.reply for e in ends] == [0, 1]
    model, tok = _hf(tiny_llama_dir)
    first = _reference_reply(tiny_llama_dir, [{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": finals[0]}], 10)
    ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": finals[0]}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    # the first reply's tokens as generated, then SmolLM2's ChatML between reply and next turn
    ids = ids + first + tok.encode("<|im_end|>\n<|im_start|>user\n" + finals[1] +
                                   "<|im_end|>\n<|im_start|>assistant\n",
                                   add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                             pad_token_id=2)[0, len(ids):].tolist()
    second = out[: out.index(2)] if 2 in out else out
    assert ends[0].text == r.lm.decode(first)
    assert ends[1].text == r.lm.decode(second)


def test_threaded_responder_gives_the_same_reply(real_bundle: Path, tiny_chat_bundle: Path
                                                 ) -> None:
    inline, _ = _run(real_bundle, tiny_chat_bundle, ["arctic_a0007.wav"], threaded=False,
                     max_reply_tokens=12)
    threaded, r = _run(real_bundle, tiny_chat_bundle, ["arctic_a0007.wav"], threaded=True,
                       max_reply_tokens=12)
    a = [e.text for e in inline if isinstance(e, ReplyEnd)]
    b = [e.text for e in threaded if isinstance(e, ReplyEnd)]
    assert a == b and len(a) == 1
    assert r.worker.thread is not None and not r.worker.thread.is_alive()


def test_barge_in_keeps_the_reply_so_far(tiny_chat_bundle: Path, tiny_llama_dir: Path) -> None:
    """A reply cut after three tokens stays in the conversation: the next turn's logits equal
    transformers' forward over system, turn, those three tokens, the template's closing text
    and the new turn."""
    from edgestream.runtime.responder import load_lm
    from edgestream.runtime.responder.conversation import Conversation

    lm = load_lm(tiny_chat_bundle, provider="cpu")
    conv = Conversation(lm, SYSTEM, 16)
    conv.read("Hello there")
    conv.begin_reply("Hello there, robot")
    cut = [conv.next_token() for _ in range(3)]
    conv.close()  # barge-in
    conv.read("And now")
    logits = conv.reader.finish("And now?", lm.spec.chat["after_user"])
    model, tok = _hf(tiny_llama_dir)
    ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "Hello there, robot"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    ids += cut + tok.encode("<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n"
                            "<|im_start|>assistant\n", add_special_tokens=False)
    assert conv.engine.tokens == ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(logits - ref).max() < 1e-3


def test_long_conversation_runs_past_the_window(tiny_chat_bundle: Path) -> None:
    """Many turns through 256 KV slots: the ring wraps, the system prompt stays pinned."""
    from edgestream.runtime.responder import load_lm
    from edgestream.runtime.responder.conversation import Conversation

    lm = load_lm(tiny_chat_bundle, provider="cpu")
    conv = Conversation(lm, SYSTEM, 8)
    pinned = list(conv.system_ids)
    for turn in range(20):
        conv.read(f"turn {turn} says something")
        conv.begin_reply(f"turn {turn} says something long enough")
        while conv.next_token() is not None:
            pass
        conv.close()
    assert conv.engine.position > 2 * lm.spec.kv_slots
    slots = conv.engine.kv.slot_pos
    assert list(slots[: len(pinned)]) == list(range(len(pinned)))  # sinks kept
    assert conv.engine.tokens[: len(pinned)] == pinned


def test_bad_inputs_name_the_problem(real_bundle: Path, tiny_chat_bundle: Path) -> None:
    from edgestream.runtime import load
    from edgestream.runtime.errors import BundleError, OptionError
    from edgestream.runtime.responder import load_lm
    from edgestream.runtime.responder.conversation import Conversation

    with pytest.raises(BundleError, match="language-model bundle, not a speech model.*--respond"):
        load(tiny_chat_bundle)
    with pytest.raises(BundleError, match="speech bundle.*not a language model"):
        load_lm(real_bundle)
    lm = load_lm(tiny_chat_bundle, provider="cpu")
    with pytest.raises(OptionError, match="system prompt is [0-9]+ tokens.*--kv-slots"):
        Conversation(lm, "word " * 400, 16)


def test_cli_run_with_responder(real_bundle: Path, tiny_chat_bundle: Path) -> None:
    import subprocess
    import sys

    from conftest import validate_event

    exe = Path(sys.executable).parent / "edgestream"
    p = subprocess.run([str(exe), "run", str(real_bundle), "--input",
                        str(speech_dir() / "arctic_a0007.wav"), "--respond",
                        str(tiny_chat_bundle), "--system-prompt", SYSTEM,
                        "--max-reply-tokens", "8", "--jsonl", "--provider", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]
    for e in events:
        validate_event(e)
    assert any(e["type"] == "reply_end" and e["reply"] == 0 for e in events)
    p = subprocess.run([str(exe), "run", str(real_bundle), "--input",
                        str(speech_dir() / "arctic_a0007.wav"), "--respond", str(real_bundle)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "not a language model" in p.stderr
