"""The LM part of a `decoder_lm` bundle's manifest (`extra.lm`), parsed and checked field by
field: the attention layers' state names, ring capacity, chunk size, stop tokens, chat pieces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgestream.runtime.errors import BundleError
from edgestream.runtime.manifest import MANIFEST_NAME, Manifest

CHAT_PIECES = ("system_prefix", "after_system", "after_user", "after_assistant")
# how the graph hands over KV rows (export/lm/gqa.py): `ring_rows`, the pass's new rows out, the
# runtime writes them into a ring (bundles without the field use it); `gqa_inplace`, one
# GroupQueryAttention per layer writes them into the buffer bound as input and output
KV_LAYOUTS = ("ring_rows", "gqa_inplace")


@dataclass(frozen=True)
class LMSpec:
    """`kv_slots`: rows of every ring KV buffer (C); `chunk_tokens`: K of the prefill chunk;
    `kv`: (k input, v input, k output, v output) per attention layer; `stop`: token ids that
    end a reply; `pad`: the token that fills a short chunk (its rows are never kept)."""

    kv_slots: int
    chunk_tokens: int
    kv: tuple[tuple[str, str, str, str], ...]
    kv_shape: tuple[int, ...]
    vocab: int
    stop: tuple[int, ...]
    pad: int
    chat: dict[str, str]
    max_position: int
    # (input, output, shape) of small states replaced every pass (LFM2's conv carries)
    recurrent: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    # slot-axis sizes the graph runs at, ascending, the last = kv_slots (a bundle whose slot
    # axis is static has only kv_slots)
    kv_buckets: tuple[int, ...] = ()
    kv_layout: str = "ring_rows"


def _int(obj: dict[str, Any], key: str, low: int = 1) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BundleError(f"{MANIFEST_NAME}: extra.lm.{key} must be a whole number >= {low}, "
                          f"got {value!r}; re-export the bundle")
    return value


def _buckets(lm: dict[str, Any], where: str) -> tuple[int, ...]:
    slots = _int(lm, "kv_slots", 2)
    sizes = lm.get("kv_buckets", [slots])
    if not isinstance(sizes, list) or not sizes or sizes != sorted(set(sizes)) or \
            sizes[-1] != slots or not all(isinstance(n, int) and n > 0 for n in sizes):
        raise BundleError(f"{where}/{MANIFEST_NAME}: extra.lm.kv_buckets must list ascending "
                          f"slot counts ending at kv_slots ({slots}), got {sizes!r}; re-export")
    return tuple(sizes)


def parse_lm_spec(manifest: Manifest, where: str) -> LMSpec:
    """Read `extra.lm`; refuse a bundle that is not an LM bundle, naming what it is instead."""
    if manifest.pipeline != "decoder_lm":
        raise BundleError(f"{where}: this is a {manifest.family} speech bundle (pipeline "
                          f"{manifest.pipeline}), not a language model; give it as the ASR "
                          "bundle and an LM bundle (`edgestream export builtin:smollm2-135m-"
                          "instruct`) to --respond")
    lm = manifest.extra.get("lm")
    if not isinstance(lm, dict):
        raise BundleError(f"{where}/{MANIFEST_NAME}: field extra.lm is missing; re-export the "
                          "bundle")
    for g in ("step", "chunk"):
        manifest.graph(g)
    chat = lm.get("chat")
    if not isinstance(chat, dict) or any(not isinstance(chat.get(p), str) for p in CHAT_PIECES):
        raise BundleError(f"{where}/{MANIFEST_NAME}: extra.lm.chat must hold the text pieces "
                          f"{', '.join(CHAT_PIECES)}; re-export the bundle")
    step = manifest.graph("step")
    kv = []
    for i, layer in enumerate(lm.get("attention_layers", [])):
        names = tuple(layer.get(k) for k in ("k", "v", "new_k", "new_v"))
        if step.input(names[0]) is None or step.input(names[1]) is None or \
                step.output(names[2]) is None or step.output(names[3]) is None:
            raise BundleError(f"{where}/{MANIFEST_NAME}: extra.lm.attention_layers[{i}] names "
                              f"{list(names)}, which graph 'step' does not have; re-export")
        kv.append(names)
    recurrent = []
    for i, r in enumerate(lm.get("recurrent_states", [])):
        inp, out = r.get("input"), r.get("output")
        if step.input(inp) is None or step.output(out) is None or \
                step.input(inp).shape != step.output(out).shape:
            raise BundleError(f"{where}/{MANIFEST_NAME}: extra.lm.recurrent_states[{i}] names "
                              f"{inp!r} -> {out!r}, which graph 'step' does not have with one "
                              "shape; re-export")
        recurrent.append((inp, out, step.input(inp).shape))
    if not kv:
        raise BundleError(f"{where}/{MANIFEST_NAME}: extra.lm.attention_layers is empty")
    shape = step.input(kv[0][0]).shape
    stop = lm.get("stop")
    if not isinstance(stop, list) or not stop or not all(isinstance(t, int) for t in stop):
        raise BundleError(f"{where}/{MANIFEST_NAME}: extra.lm.stop must list the token ids that "
                          "end a reply")
    layout = lm.get("kv_layout", "ring_rows")
    if layout not in KV_LAYOUTS:
        raise BundleError(f"{where}/{MANIFEST_NAME}: extra.lm.kv_layout {layout!r} is not a KV "
                          f"layout this runtime knows ({', '.join(KV_LAYOUTS)}); update "
                          "edgestream or re-export the bundle with this version")
    if layout == "gqa_inplace" and recurrent:
        raise BundleError(f"{where}/{MANIFEST_NAME}: extra.lm.kv_layout gqa_inplace with "
                          "recurrent states is not supported; re-export the bundle")
    spec = LMSpec(kv_slots=_int(lm, "kv_slots", 2), chunk_tokens=_int(lm, "chunk_tokens", 2),
                  kv=tuple(kv), kv_shape=shape, vocab=_int(lm, "vocab"), stop=tuple(stop),
                  pad=_int(lm, "pad", 0), chat={p: chat[p] for p in CHAT_PIECES},
                  max_position=_int(lm, "max_position"), recurrent=tuple(recurrent),
                  kv_buckets=_buckets(lm, where), kv_layout=layout)
    if shape[2] != spec.kv_slots or manifest.graph("chunk").input("input_ids").shape[1] != \
            spec.chunk_tokens:
        raise BundleError(f"{where}/{MANIFEST_NAME}: extra.lm.kv_slots/chunk_tokens disagree "
                          "with the graph shapes; re-export the bundle")
    return spec
