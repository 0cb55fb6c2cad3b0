"""8-bit MatMulNBits weights stored as two 4-bit halves, so they run with fp32 activations fast.

A graph run at several token counts (a decoder's one-token step and K-token block) must keep its
activations in fp32 for the block and the steps to agree (exact re-scoring; see
`quantize.ACCURACY_FP32_ACTIVATIONS`). onnxruntime (1.32, x86) has a fast fp32-activation kernel
for 4-bit MatMulNBits but not for 8-bit: that one dequantizes the whole weight on every call
(moonshine_streaming tiny decoder step 1.4 s instead of 45 ms). So each 8-bit weight is split
exactly: a stored byte u (value (u - 128) * s) is 16 * hi + lo with two nibbles, and

    (u - 128) * s  =  (hi - 8) * 16 s  +  (lo - 0) * s

which is two 4-bit MatMulNBits with fp32 activations sharing the scales s (the first with the
default zero point 8, its result times 16, the second with zero points 0) and an Add. The weights are the same
8-bit values to the bit, the bytes on disk and in memory the same count (two nibbles per weight,
plus one zero-point nibble per block), and a tied embedding Gather that read the 8-bit bytes is
pointed at the two halves, so nothing is stored twice.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgestream.export.qgather import _Builder

MS_DOMAIN = "com.microsoft"


def _pack(nibbles: np.ndarray) -> np.ndarray:
    """[..., block] values 0..15 -> [..., block / 2] bytes, element 2i in the low nibble."""
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)


def _unpacked_rows(b: _Builder, table: str, ids: str, axis: str) -> str:
    """Gather rows of a packed 4-bit table `[V, blocks, block/2]` -> `[N, blocks, block]`."""
    rows = b.op("Gather", [table, ids], axis=0)
    lo = b.op("BitwiseAnd", [rows, b.const("low", np.array(15, np.uint8))])
    hi = b.op("BitShift", [rows, b.const("four", np.array(4, np.uint8))], direction="RIGHT")
    pairs = b.op("Concat", [b.op("Unsqueeze", [lo, axis]), b.op("Unsqueeze", [hi, axis])],
                 axis=-1)
    shape = b.op("Shape", [rows])
    whole = b.op("Concat", [b.op("Slice", [shape, b.const("z", np.array([0])),
                                          b.const("two", np.array([2]))]),
                            b.const("m1", np.array([-1], np.int64))], axis=0)
    return b.op("Reshape", [pairs, whole])


def split_8bit(model: onnx.ModelProto, accuracy_level: int = 1) -> int:
    """Rewrite every 8-bit symmetric MatMulNBits (no zero-point input) of `model` as two 4-bit
    MatMulNBits at `accuracy_level` plus an Add; returns the count rewritten."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes: list[onnx.NodeProto] = []
    split: dict[str, tuple[str, str]] = {}  # 8-bit table -> (hi table, lo table)
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "MatMulNBits" or attrs.get("bits") != 8
                or (len(node.input) > 3 and node.input[3]) or node.input[1] not in inits):
            nodes.append(node)
            continue
        table = node.input[1]
        u = numpy_helper.to_array(inits[table]).astype(np.uint8)  # [N, blocks, block]
        n, blocks = u.shape[0], u.shape[1]
        hi, lo, zp = f"{table}_hi4", f"{table}_lo4", f"{table}_lo4_zero"
        g.initializer.extend([numpy_helper.from_array(_pack(u >> 4), hi),
                              numpy_helper.from_array(_pack(u & 15), lo),
                              numpy_helper.from_array(np.zeros((n, (blocks + 1) // 2), np.uint8),
                                                      zp)])
        if "split_x16" not in inits:
            inits["split_x16"] = numpy_helper.from_array(np.array(16, np.float32), "split_x16")
            g.initializer.append(inits["split_x16"])
        split[table] = (hi, lo)
        four = dict(attrs, bits=4, accuracy_level=accuracy_level)
        out = node.output[0]
        # both halves share the 8-bit scales; x 16 afterwards is exact (a power of two)
        nodes += [
            helper.make_node("MatMulNBits", [node.input[0], hi, node.input[2]], [f"{out}_hi4"],
                             name=f"{out}_hi4_node", domain=MS_DOMAIN, **four),
            helper.make_node("Mul", [f"{out}_hi4", "split_x16"], [f"{out}_hi4x16"],
                             name=f"{out}_x16_node"),
            helper.make_node("MatMulNBits", [node.input[0], lo, node.input[2], zp],
                             [f"{out}_lo4"], name=f"{out}_lo4_node", domain=MS_DOMAIN, **four),
            helper.make_node("Add", [f"{out}_hi4x16", f"{out}_lo4"], [out],
                             name=f"{out}_add_node")]
    del g.node[:]
    g.node.extend(nodes)
    _repoint_gathers(model, split)
    read = {i for n in g.node for i in n.input}
    for name in split:
        if name not in read:
            g.initializer.remove(inits[name])
    return len(split)


def _repoint_gathers(model: onnx.ModelProto, split: dict[str, tuple[str, str]]) -> None:
    """A quantized embedding Gather (`qgather`) reads rows of an 8-bit table and casts them to
    float: rebuild those same values from the two 4-bit halves (16 * hi + lo, as float), so the
    8-bit table can go."""
    g = model.graph
    for node in list(g.node):
        if node.op_type != "Gather" or node.input[0] not in split:
            continue
        hi, lo = split[node.input[0]]
        b = _Builder(g, f"{node.input[0]}/split")
        axis = b.const("last", np.array([-1], np.int64))
        # in float (exact for 0..255): the Gather's readers cast its bytes to float anyway, and
        # no operator beyond the int4 gather's own is needed
        high = b.op("Mul", [b.op("Cast", [_unpacked_rows(b, hi, node.input[1], axis)],
                                 to=onnx.TensorProto.FLOAT),
                            b.const("by16", np.array(16, np.float32))])
        low = b.op("Cast", [_unpacked_rows(b, lo, node.input[1], axis)], to=onnx.TensorProto.FLOAT)
        b.op("Add", [high, low], node.output[0])
        at = list(g.node).index(node)
        g.node.remove(node)
        for k, n in enumerate(b.nodes):
            g.node.insert(at + k, n)


__all__ = ["split_8bit"]
