"""Chat templates rendered once, on the workstation, into the plain pieces a device concatenates:
the device has a tokenizer but no template engine.

A conversation on the device is
    system_prefix + SYSTEM + after_system + USER + after_user + REPLY
    + after_assistant + USER + after_user + REPLY ...
where each piece is the exact text the model's own template puts between two messages (role
suffix of one plus role prefix of the next; `after_user` ends with the generation prompt).
"""

from __future__ import annotations

from typing import Any

from edgestream.export.errors import ExportError

# private-use characters: no template or tokenizer treats them specially
_SYS, _USER, _REPLY, _USER2 = "\ue000S\ue000", "\ue000U\ue000", "\ue000A\ue000", "\ue000V\ue000"
PIECES = ("system_prefix", "after_system", "after_user", "after_assistant")


def _render(tok: Any, messages: list[dict[str, str]], generation: bool) -> str:
    # enable_thinking is read by Qwen3-style templates and ignored by the rest: a voice reply
    # should not start with a hidden reasoning block
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                   enable_thinking=False)


def chat_pieces(tok: Any, where: str) -> dict[str, str]:
    """The four pieces of `tok`'s chat template; a tokenizer without one is an error."""
    if not getattr(tok, "chat_template", None):
        raise ExportError(f"{where}: the tokenizer has no chat template (tokenizer_config.json "
                          "chat_template is empty); a responder needs one. Use an instruct/chat "
                          "checkpoint, or add a chat_template to its tokenizer_config.json")
    try:
        one = _render(tok, [{"role": "system", "content": _SYS},
                            {"role": "user", "content": _USER}], True)
        two = _render(tok, [{"role": "system", "content": _SYS},
                            {"role": "user", "content": _USER},
                            {"role": "assistant", "content": _REPLY},
                            {"role": "user", "content": _USER2}], True)
    except Exception as e:  # jinja raises its own types (e.g. a template without system role)
        raise ExportError(f"{where}: the chat template cannot render a system + user + assistant "
                          f"conversation ({e}); a responder needs all three roles") from e
    for text, marks in ((one, (_SYS, _USER)), (two, (_SYS, _USER, _REPLY, _USER2))):
        if any(text.count(m) != 1 for m in marks):
            raise ExportError(f"{where}: the chat template does not place each message exactly "
                              "once; it cannot be split into plain pieces")
    pieces = {
        "system_prefix": one[:one.index(_SYS)],
        "after_system": one[one.index(_SYS) + len(_SYS): one.index(_USER)],
        "after_user": one[one.index(_USER) + len(_USER):],
        "after_assistant": two[two.index(_REPLY) + len(_REPLY): two.index(_USER2)],
    }
    if two[two.index(_USER2) + len(_USER2):] != pieces["after_user"]:
        raise ExportError(f"{where}: the chat template's generation prompt differs between turns; "
                          "it cannot be split into plain pieces")
    return pieces


def render_conversation(pieces: dict[str, str], system: str, turns: list[tuple[str, str]],
                        user: str) -> str:
    """The text the pieces give for `system`, finished (user, reply) turns and a new `user`
    message, ending with the generation prompt (what the device feeds before a reply)."""
    text = pieces["system_prefix"] + system + pieces["after_system"]
    for u, reply in turns:
        text += u + pieces["after_user"] + reply + pieces["after_assistant"]
    return text + user + pieces["after_user"]
