"""Whisper graphs rewritten onto onnxruntime's fused CPU kernels, at export.

onnxruntime 1.32's own optimizer leaves two hot spots of the exported Whisper graphs unfused:

- GELU in its erf form, ``x * (0.5 * (1 + erf(x / sqrt 2)))`` (five element-wise passes over
  ``[1, 1500, 1536]`` per encoder layer): its GeluFusion does not match this operand order. It
  becomes one ``com.microsoft.Gelu``, which onnxruntime then merges with the preceding bias add
  (BiasGelu).
- Attention, ``MatMul(Q, K^T) -> Softmax -> MatMul(P, V)`` between head split/merge reshapes:
  the encoder's 1500 x 1500 self-attention runs as two batched fp32 MatMuls and a Softmax over
  materialised ``[heads, 1500, 1500]`` scores. It becomes one ``com.microsoft.MultiHeadAttention``
  over the projected ``[1, S, D]`` tensors, whose CPU kernel tiles the softmax (flash attention)
  instead of storing the whole score matrix. The decoder's cross-attention over the cached
  ``[1, heads, 1500, head_dim]`` encoder keys and values becomes the same operator with its key
  and value given in that head-split layout, and so does its self-attention over
  ``Concat(cache, own rows)``, whose additive mask becomes the operator's attention bias; that
  self-attention then reads only the cache rows before `position` (`trim_cached_attention`).

An attention is rewritten only when every reshape/transpose between the projections and the
MatMuls is proven to be exactly the head split (and the output chain exactly the head merge): the
chain is replayed on an index tensor, so a graph the pattern does not describe is left alone rather
than rewritten wrongly. Softmax must read the scores MatMul directly or through one additive mask
(no scale in between), so the operator's scale is 1 (Whisper scales Q before the product).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from edgestream.export.attention_rows import _static_dims
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_LAYOUT_OPS = ("Reshape", "Transpose")


@dataclass(frozen=True)
class FusionCounts:
    """How many patterns one pass rewrote."""

    gelu: int
    attention: int
    trimmed: int = 0  # self-attentions reading only the cache rows before `position`


class _Graph:
    """Producer/consumer maps and constant values of one graph, rebuilt after each rewrite."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.inits = {i.name: i for i in g.initializer}
        self.consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of `name` (initializer or Constant node), else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.consts.get(name)
        if node is not None:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                return numpy_helper.to_array(attr.t)
        return None

    def scalar(self, name: str) -> float | None:
        v = self.value(name)
        return float(v) if v is not None and v.size == 1 else None

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def _replay(g: _Graph, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray | None:
    """`node` (a Reshape or Transpose) applied to the index tensor `x`; None if not static."""
    if node.op_type == "Transpose":
        perm = _attr(node, "perm")
        return x.transpose(list(perm)) if perm is not None else x.T
    shape = g.value(node.input[1])
    if shape is None:
        return None
    shape = [int(s) for s in shape]
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    try:
        return x.reshape(shape)
    except ValueError:
        return None


def _chain_back(g: _Graph, name: str) -> tuple[str, list[onnx.NodeProto]]:
    """The tensor before the Reshape/Transpose chain ending at `name`, and the chain in order."""
    chain: list[onnx.NodeProto] = []
    node = g.producer.get(name)
    while node is not None and node.op_type in _LAYOUT_OPS:
        chain.insert(0, node)
        name = node.input[0]
        node = g.producer.get(name)
    return name, chain


PROBE_SIZES = (5, 7)  # a symbolic axis (the decoder's tokens) is replayed at these sizes


def _concrete(shape: list[int | None], size: int) -> list[int]:
    return [size if d is None else d for d in shape]


def _split_heads(g: _Graph, dims: dict, name: str, heads: int, head_dim: int,
                 perm: tuple[int, ...]) -> str | None:
    """The `[B, S, heads*head_dim]` tensor whose head split (reshape to `[B, S, heads,
    head_dim]`, transpose `perm`) is `name`, or `name` itself when it is a 4-D tensor with no
    layout chain before it that already has the split layout `[B, heads, S, head_dim]` (the
    decoder's cached cross K/V); None when the chain does something else."""
    root, chain = _chain_back(g, name)
    shape = dims.get(root)
    if not shape:
        return None
    if not chain:
        ok = len(shape) == 4 and shape[1] == heads and shape[3] == head_dim and \
            perm == (0, 2, 1, 3) and shape[0] is not None
        return root if ok else None
    if len(shape) != 3 or shape[2] != heads * head_dim or shape[0] is None:
        return None
    for size in PROBE_SIZES:  # proven at two sizes of a symbolic axis, once if all static
        real = _concrete(shape, size)
        x = np.arange(int(np.prod(real)), dtype=np.int64).reshape(real)
        want = x.reshape(real[0], real[1], heads, head_dim).transpose(perm)
        for node in chain:
            x = _replay(g, node, x)
            if x is None:
                return None
        if x.shape != want.shape or not np.array_equal(x, want):
            return None
    return root


def _merge_heads(g: _Graph, dims: dict, name: str
                 ) -> tuple[str, list[onnx.NodeProto]] | None:
    """Follow the sole-consumer Reshape/Transpose chain after the `[B, H, S, Dh]` attention
    output `name` to the tensor that is exactly its head merge `[B, S, H*Dh]`."""
    shape = dims.get(name)
    if not shape or len(shape) != 4 or None in (shape[0], shape[1], shape[3]):
        return None
    chain: list[onnx.NodeProto] = []
    while True:
        node = g.sole_consumer(name)
        if node is None or node.op_type not in _LAYOUT_OPS or node.input[0] != name:
            return None
        chain.append(node)
        name = node.output[0]
        if all(_merges(g, chain, _concrete(shape, size)) for size in PROBE_SIZES):
            return name, chain
        if len(chain) > 4:
            return None


def _merges(g: _Graph, chain: list[onnx.NodeProto], shape: list[int]) -> bool:
    """True when `chain` turns a `[B, H, S, Dh]` tensor into exactly its `[B, S, H*Dh]` merge."""
    b, h, s, dh = shape
    x: np.ndarray | None = np.arange(b * h * s * dh, dtype=np.int64).reshape(shape)
    want = x.transpose(0, 2, 1, 3).reshape(b, s, h * dh)
    for node in chain:
        x = _replay(g, node, x)
        if x is None:
            return False
    return x.shape == want.shape and np.array_equal(x, want)


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite each head-split ``MatMul -> Softmax -> MatMul`` attention into
    ``com.microsoft.MultiHeadAttention``; returns the count."""
    dims = _static_dims(model)
    done = 0
    for soft in [n for n in model.graph.node if n.op_type == "Softmax"]:
        g = _Graph(model)
        if _attr(soft, "axis", -1) not in (-1, 3):
            continue
        scores = g.producer.get(soft.input[0])
        bias, add = None, None  # an additive mask between the product and the softmax
        if scores is not None and scores.op_type == "Add" and \
                g.sole_consumer(scores.output[0]) is soft:
            product = [g.producer.get(i) for i in scores.input]
            at = next((j for j, n in enumerate(product) if n is not None and
                       n.op_type == "MatMul" and g.sole_consumer(n.output[0]) is scores), None)
            if at is not None:
                bias, add = scores.input[1 - at], scores
                scores = product[at]
        pv = g.sole_consumer(soft.output[0])
        if scores is None or scores.op_type != "MatMul" or pv is None or \
                pv.op_type != "MatMul" or pv.input[0] != soft.output[0] or \
                g.sole_consumer(scores.output[0]) not in (soft, add if bias else None):
            continue
        q_shape = dims.get(scores.input[0])
        if not q_shape or len(q_shape) != 4 or None in (q_shape[1], q_shape[3]):
            continue
        heads, head_dim = q_shape[1], q_shape[3]
        if bias is not None and not _bias_fits(dims.get(bias), heads):
            continue
        q = _split_heads(g, dims, scores.input[0], heads, head_dim, (0, 2, 1, 3))
        k = _split_heads(g, dims, scores.input[1], heads, head_dim, (0, 2, 3, 1))
        if k is None:  # cached keys [B, H, S, Dh] transposed once for the product
            t = g.producer.get(scores.input[1])
            if t is not None and t.op_type == "Transpose" and \
                    tuple(_attr(t, "perm") or ()) == (0, 1, 3, 2):
                k = _split_heads(g, dims, t.input[0], heads, head_dim, (0, 2, 1, 3))
        v = _split_heads(g, dims, pv.input[1], heads, head_dim, (0, 2, 1, 3))
        merged = _merge_heads(g, dims, pv.output[0])
        if None in (q, k, v) or merged is None:
            continue
        if len(dims[k]) != len(dims[v]) or (len(dims[q]) != 3):
            continue  # MHA takes K and V both projected [B, S, D] or both split [B, H, S, Dh]
        out, chain = merged
        inputs = [q, k, v] + (["", "", bias] if bias is not None else [])
        mha = helper.make_node("MultiHeadAttention", inputs, [out], domain=MS_DOMAIN,
                               num_heads=heads, scale=1.0, name=f"{soft.name}/mha")
        nodes = list(model.graph.node)
        at = nodes.index(chain[-1])
        model.graph.node.insert(at + 1, mha)
        for n in (scores, soft, pv, *chain, *([add] if bias is not None else [])):
            model.graph.node.remove(n)
        done += 1
    return done


def _bias_fits(shape: list[int | None] | None, heads: int) -> bool:
    """MultiHeadAttention's attention_bias is `[1, H or 1, S, total S]` (batch 1 here)."""
    return shape is not None and len(shape) == 4 and shape[0] == 1 and shape[1] in (1, heads)


def fuse_gelu(model: onnx.ModelProto) -> int:
    """Rewrite ``x * (0.5 * (1 + erf(x / sqrt 2)))`` (any order of the two Muls' operands) into
    ``com.microsoft.Gelu``; returns the count."""
    done = 0
    for erf in [n for n in model.graph.node if n.op_type == "Erf"]:
        g = _Graph(model)
        div = g.producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or g.sole_consumer(div.output[0]) is not erf:
            continue
        root2 = g.scalar(div.input[1])
        if root2 is None or abs(root2 - np.sqrt(2.0)) > 1e-6:
            continue
        x = div.input[0]
        add = g.sole_consumer(erf.output[0])
        if add is None or add.op_type != "Add":
            continue
        one = [i for i in add.input if i != erf.output[0]]
        if len(one) != 1 or g.scalar(one[0]) != 1.0:
            continue
        m1 = g.sole_consumer(add.output[0])
        m2 = g.sole_consumer(m1.output[0]) if m1 is not None else None
        if m1 is None or m2 is None or m1.op_type != "Mul" or m2.op_type != "Mul":
            continue
        others = [i for i in m1.input if i != add.output[0]] + \
            [i for i in m2.input if i != m1.output[0]]
        if len(others) != 2 or x not in others:
            continue
        half = others[1 - others.index(x)]
        if g.scalar(half) != 0.5:
            continue
        gelu = helper.make_node("Gelu", [x], [m2.output[0]], domain=MS_DOMAIN,
                                name=f"{erf.name}/gelu")
        model.graph.node.insert(list(model.graph.node).index(m2), gelu)
        for n in (div, erf, add, m1, m2):
            model.graph.node.remove(n)
        done += 1
    return done


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes (and initializers) nothing reads any more."""
    g = model.graph
    while True:
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    read = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in read]:
        g.initializer.remove(init)
    live = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    for vi in [v for v in g.value_info if v.name not in live]:
        g.value_info.remove(vi)


POSITION = "position"  # the decoder's input: where this step's rows go in the cache


def trim_cached_attention(model: onnx.ModelProto) -> int:
    """Make each fused decoder self-attention read only the cache rows before `position`.

    The decoder attends ``Concat(cache [1, H, T_max, Dh], own rows)`` under an additive mask
    whose columns follow those keys; the cache rows at or after `position` are masked with
    float32's lowest value (graphs.py), so their softmax weight is exactly 0. Slicing the cache
    to ``[:position]`` and the mask's columns to ``[:position] + [T_max:]`` therefore computes
    the same attention over `position` + T keys instead of T_max + T, and the concatenation copies
    `position` rows instead of the whole cache every step. Returns the count."""
    g = _Graph(model)
    inputs = {i.name: i for i in model.graph.input}
    if POSITION not in inputs:
        return 0
    dims = _static_dims(model)
    names = {o for n in model.graph.node for o in n.output} | set(g.inits) | set(inputs)

    def fresh(hint: str) -> str:
        n = hint
        while n in names:
            n += "_"
        names.add(n)
        return n

    def const(hint: str, values: list[int]) -> str:
        name = fresh(hint)
        model.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    # unused ones are dropped with the dead nodes (`fuse_model`)
    zero, two, three = const("trim/zero", [0]), const("trim/axis2", [2]), const("trim/axis3", [3])
    trimmed_masks: dict[str, str] = {}
    done = 0
    for mha in [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]:
        if len(mha.input) < 6 or not mha.input[5]:
            continue
        cats = [g.producer.get(mha.input[i]) for i in (1, 2)]
        if any(c is None or c.op_type != "Concat" or _attr(c, "axis") != 2 or
               len(c.input) != 2 or c.input[0] not in inputs for c in cats):
            continue
        rows = {(dims.get(c.input[0]) or [None] * 3)[2] for c in cats}
        if len(rows) != 1 or None in rows:
            continue
        t_max = rows.pop()
        new: list[onnx.NodeProto] = []
        for c in cats:  # the cache before `position`, then this step's rows
            kept = fresh(f"{c.input[0]}/before_position")
            new.append(helper.make_node("Slice", [c.input[0], zero, POSITION, two], [kept],
                                        name=fresh(f"{c.name}/trim")))
            c.input[0] = kept
        mask = mha.input[5]
        if mask not in trimmed_masks:
            cached, own, out = (fresh(f"{mask}/{x}") for x in ("cached", "own", "trimmed"))
            big = const("trim/end", [np.iinfo(np.int64).max])
            new += [helper.make_node("Slice", [mask, zero, POSITION, three], [cached],
                                     name=fresh(f"{mask}/slice_cached")),
                    helper.make_node("Slice", [mask, const("trim/t_max", [t_max]), big, three],
                                     [own], name=fresh(f"{mask}/slice_own")),
                    helper.make_node("Concat", [cached, own], [out], axis=3,
                                     name=fresh(f"{mask}/trimmed"))]
            trimmed_masks[mask] = out
        mha.input[5] = trimmed_masks[mask]
        at = min(list(model.graph.node).index(c) for c in cats)
        for j, n in enumerate(new):
            model.graph.node.insert(at + j, n)
        done += 1
    return done


def fuse_model(model: onnx.ModelProto) -> FusionCounts:
    """All rewrites in place; declares the com.microsoft opset when anything was fused."""
    gelu, attention = fuse_gelu(model), fuse_attention(model)
    counts = FusionCounts(gelu, attention, trim_cached_attention(model) if attention else 0)
    if counts.gelu or counts.attention:
        _drop_dead(model)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def fuse_file(path: Path) -> FusionCounts:
    """`fuse_model` on one ONNX file, saved in place when anything changed."""
    from edgestream.export.onnx_export import save_model

    model = onnx.load(str(path))
    counts = fuse_model(model)
    if counts.gelu or counts.attention:
        save_model(model, Path(path))
    log.info("%s: %d GELU and %d attention(s) fused, %d reading the cache up to position",
             Path(path).name, counts.gelu, counts.attention, counts.trimmed)
    return counts
