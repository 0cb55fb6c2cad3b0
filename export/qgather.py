"""Quantized embedding lookups that read the tied output projection's quantized weights.

Whisper (and moonshine_streaming) tie the token embedding to the output projection. After
quantization the projection holds the vocabulary matrix as int8 (dynamic: `MatMulInteger`,
`[d, V]` with one scale per vocabulary row) or as 4/8-bit blocks (`MatMulNBits`, `[V, blocks,
bytes]` with one scale per block). The embedding `Gather` is rewritten to read those same bytes and
dequantize only the rows it gathers, so the fp32 table (80 MB for tiny.en) leaves the bundle and
the vocabulary matrix is stored once (issue 7). Only standard ONNX operators are used, so every
execution provider runs it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)


class _Builder:
    """Appends nodes and constants with unique names next to one Gather."""

    def __init__(self, graph: onnx.GraphProto, prefix: str) -> None:
        self.graph, self.prefix, self.nodes = graph, prefix, []
        self.names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}

    def name(self, hint: str) -> str:
        n = f"{self.prefix}/{hint}"
        while n in self.names:
            n += "_"
        self.names.add(n)
        return n

    def const(self, hint: str, value: np.ndarray) -> str:
        n = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(value, n))
        return n

    def op(self, op: str, inputs: list[str], out: str | None = None, **attrs: object) -> str:
        out = out or self.name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(f"{op}_node"),
                                           **attrs))
        return out


def _flat_ids(b: _Builder, ids: str) -> tuple[str, str]:
    """(ids as 1-D, the shape of `ids`)."""
    shape = b.op("Shape", [ids])
    return b.op("Reshape", [ids, b.const("flat", np.array([-1], np.int64))]), shape


def _finish(b: _Builder, rows: str, ids_shape: str, width: int, out: str) -> None:
    """[N, width] rows -> ids.shape + [width], written to the Gather's original output."""
    full = b.op("Concat", [ids_shape, b.const("width", np.array([width], np.int64))], axis=0)
    b.op("Reshape", [rows, full], out)


def gather_from_dynamic(b: _Builder, ids: str, out: str, q: onnx.TensorProto, scale: np.ndarray,
                        zero: np.ndarray) -> None:
    """Rows of an int8 `[d, V]` MatMulInteger weight with per-column (or one) scale and zero
    point."""
    flat, shape = _flat_ids(b, ids)
    cols = b.op("Cast", [b.op("Gather", [q.name, flat], axis=1)], to=TensorProto.FLOAT)  # [d, N]
    def per_column(hint: str, values: np.ndarray) -> str:
        """A scale or zero point: one per vocabulary column (per-channel), or one for all."""
        c = b.const(hint, values.astype(np.float32))
        return c if values.size == 1 else b.op("Gather", [c, flat])

    if np.any(zero):
        cols = b.op("Sub", [cols, per_column("zero", zero)])
    cols = b.op("Mul", [cols, per_column("scale", scale)])
    _finish(b, b.op("Transpose", [cols], perm=[1, 0]), shape, int(q.dims[0]), out)


def gather_from_nbits(b: _Builder, ids: str, out: str, packed: onnx.TensorProto, scales: str,
                      bits: int, block: int, width: int) -> None:
    """Rows of a MatMulNBits weight `[V, blocks, bytes]` (symmetric: zero point 2^(bits-1),
    element 2i in the low nibble of byte i when 4-bit), scales `[V, blocks]` or `[V * blocks]`."""
    n_blocks = int(packed.dims[1])
    flat, shape = _flat_ids(b, ids)
    rows = b.op("Gather", [packed.name, flat], axis=0)  # [N, blocks, bytes] uint8
    if bits == 4:
        lo = b.op("BitwiseAnd", [rows, b.const("low", np.array(15, np.uint8))])
        hi = b.op("BitShift", [rows, b.const("four", np.array(4, np.uint8))], direction="RIGHT")
        axis = b.const("last", np.array([-1], np.int64))
        rows = b.op("Concat", [b.op("Unsqueeze", [lo, axis]), b.op("Unsqueeze", [hi, axis])],
                    axis=-1)
    values = b.op("Reshape", [rows, b.const("blocks", np.array([-1, n_blocks, block], np.int64))])
    values = b.op("Sub", [b.op("Cast", [values], to=TensorProto.FLOAT),
                          b.const("zp", np.array(2 ** (bits - 1), np.float32))])
    by_row = b.op("Reshape", [scales, b.const("vb", np.array([-1, n_blocks], np.int64))])
    s = b.op("Unsqueeze", [b.op("Gather", [by_row, flat], axis=0), b.const("ax", np.array([-1]))])
    values = b.op("Reshape", [b.op("Mul", [values, s]),
                              b.const("padded", np.array([-1, n_blocks * block], np.int64))])
    if n_blocks * block != width:  # K padded up to whole blocks
        values = b.op("Slice", [values, b.const("s0", np.array([0])),
                                b.const("s1", np.array([width])), b.const("s2", np.array([1]))])
    _finish(b, values, shape, width, out)


def rewrite_tied_gathers(model: onnx.ModelProto, tied: dict[str, str]) -> int:
    """Point every Gather of a tied fp32 table at its quantized projection. `tied`: {embedding
    initializer: the folded transposed copy the projection read before quantization}. Removes the
    fp32 tables nobody reads any more; returns the count of rewritten Gathers."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers = {i: n for n in g.node for i in n.input}
    done = 0
    for node in list(g.node):
        if node.op_type != "Gather" or node.input[0] not in tied:
            continue
        if next((a.i for a in node.attribute if a.name == "axis"), 0) != 0:
            continue
        t = tied[node.input[0]]
        width = int(inits[node.input[0]].dims[1])
        b = _Builder(g, f"{node.input[0]}/qgather")
        if f"{t}_quantized" in inits and consumers.get(f"{t}_quantized") is not None:
            q = inits[f"{t}_quantized"]
            gather_from_dynamic(b, node.input[1], node.output[0], q,
                                numpy_helper.to_array(inits[f"{t}_scale"]).reshape(-1),
                                numpy_helper.to_array(inits[f"{t}_zero_point"]).reshape(-1))
        else:
            mm = next((n for n in g.node if n.op_type == "MatMulNBits"
                       and n.input[1].startswith(f"{t}_Q")), None)
            if mm is None or len(mm.input) > 3 and mm.input[3]:
                log.info("%s: no symmetric quantized projection reads %s; Gather left fp32",
                         node.name, t)
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
            gather_from_nbits(b, node.input[1], node.output[0], inits[mm.input[1]], mm.input[2],
                              int(attrs["bits"]), int(attrs["block_size"]), width)
        at = list(g.node).index(node)
        g.node.remove(node)
        for k, n in enumerate(b.nodes):
            g.node.insert(at + k, n)
        done += 1
    read = {i for n in g.node for i in n.input}
    for name in tied:
        if name not in read and name in inits:
            g.initializer.remove(inits[name])
    return done
