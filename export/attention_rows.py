"""Attention over long sequences computed a slice of query rows at a time, to bound peak memory.

Whisper's encoder attends 1500 frames to 1500 frames: ``MatMul(Q, K^T) -> Softmax -> MatMul(., V)``
materialises the scores and the probabilities, each ``[heads, 1500, 1500]`` floats (54 MB for
tiny.en's 6 heads), so one encoder window briefly needs about 108 MB beyond its weights, which is
most of a transcribing process's peak memory. Softmax runs along each query row and the result row
depends only on its own scores, so splitting Q along its rows and concatenating the outputs is exact
(the same arithmetic per row). onnxruntime runs the slices one after another and reuses their
buffers, so the peak falls to one slice's scores and probabilities.

The rewrite is applied only where the query length is static and at least `min_rows`; short
attentions (decoders, streaming encoders) are left alone.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

log = logging.getLogger(__name__)

MIN_ROWS = 512  # below this the scores are small and slicing only adds nodes
ROWS_PER_SLICE = 125  # Whisper: 1500 frames -> 12 slices, [heads, 125, 1500] scores each


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> its dims (None where symbolic), from the graph and shape inference."""
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # contrib operators or external data: use what the graph declares
        inferred = model
    out = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                            for d in t.shape.dim]
    return out


def slice_attention_rows(model: onnx.ModelProto, min_rows: int = MIN_ROWS,
                         rows_per_slice: int = ROWS_PER_SLICE) -> int:
    """Rewrite every ``MatMul(Q, K) -> Softmax(last axis) -> MatMul(P, V)`` whose Q has a static
    row count >= `min_rows` to run `rows_per_slice` query rows at a time. Returns the count."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    dims = _static_dims(model)
    names = inits | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    done = 0

    def fresh(hint: str) -> str:
        n = hint
        while n in names:
            n += "_"
        names.add(n)
        return n

    for soft in [n for n in g.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in soft.attribute if a.name == "axis"), -1)
        scores = producer.get(soft.input[0])
        after = consumers.get(soft.output[0], [])
        if scores is None or scores.op_type != "MatMul" or len(after) != 1 or \
                after[0].op_type != "MatMul" or after[0].input[0] != soft.output[0]:
            continue
        if len(consumers.get(scores.output[0], [])) != 1 or soft.output[0] in outputs or \
                scores.output[0] in outputs:
            continue
        q, k = scores.input
        shape = dims.get(q)
        if q in inits or k in inits or not shape or len(shape) < 2:
            continue
        rank = len(shape)
        if axis not in (-1, rank - 1):
            continue
        rows = shape[-2]
        if rows is None or rows < min_rows:
            continue
        pv = after[0]
        v = pv.input[1]
        sizes = [rows_per_slice] * (rows // rows_per_slice)
        if rows % rows_per_slice:
            sizes.append(rows % rows_per_slice)
        split = fresh(f"{soft.name}/row_slices")
        g.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), split))
        parts = [fresh(f"{soft.name}/q{i}") for i in range(len(sizes))]
        new = [helper.make_node("Split", [q, split], parts, axis=rank - 2,
                                name=fresh(f"{soft.name}/split"))]
        results = []
        for i, part in enumerate(parts):
            s, p, r = (fresh(f"{soft.name}/{x}{i}") for x in ("scores", "probs", "out"))
            new += [helper.make_node("MatMul", [part, k], [s], name=fresh(f"{scores.name}/{i}")),
                    helper.make_node("Softmax", [s], [p], axis=-1, name=fresh(f"{soft.name}/{i}")),
                    helper.make_node("MatMul", [p, v], [r], name=fresh(f"{pv.name}/{i}"))]
            results.append(r)
        new.append(helper.make_node("Concat", results, [pv.output[0]], axis=rank - 2,
                                    name=fresh(f"{pv.name}/concat")))
        at = list(g.node).index(pv) - 2  # where pv lands once scores and softmax are gone:
        for n in (scores, soft, pv):     # q, k and v are all computed by then
            g.node.remove(n)
        for j, n in enumerate(new):
            g.node.insert(at + j, n)
        done += 1
    if done:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        if opset < 13:  # Split's sizes became an input in opset 13
            raise ValueError(f"opset {opset}: attention row slicing needs opset 13 or later")
        log.info("attention: %d softmax(es) computed in slices of %d query rows", done,
                 rows_per_slice)
    return done


def slice_bundle_attention(folder, data: dict) -> int:  # type: ignore[no-untyped-def]
    """Apply `slice_attention_rows` to every model graph of a freshly exported bundle folder
    (not the VAD), re-saving and re-hashing the graphs it changed. Returns the count."""
    from pathlib import Path

    from edgestream.export.onnx_export import save_model
    from edgestream.export.quantize import refresh_entry

    total = 0
    for entry in data["graphs"]:
        if entry["name"] == data.get("vad"):
            continue
        path = Path(folder) / entry["file"]
        model = onnx.load(str(path))
        n = slice_attention_rows(model)
        if n:
            save_model(model, path)
            refresh_entry(entry, Path(folder))
            total += n
    return total
