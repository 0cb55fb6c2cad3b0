"""The `gqa_inplace` KV layout: each full-attention layer's attention core (RoPE'd q/k grouped,
scores against the cached rows and the pass's own rows, mask, softmax, two value products and
the reshapes around them: some 25 small kernels per layer and step) replaced by one onnxruntime
`com.microsoft.GroupQueryAttention` node, the kernel onnxruntime's own LM runtime uses.

GroupQueryAttention writes the pass's rows into the cache buffer itself: the runtime binds the
`k_i` input and the `present_k_i` output to the SAME buffer (IO binding), so the rows land in
place and nothing is copied. It writes at slot `seqlens_k + 1 - T` and attends slots
`[0, seqlens_k + 1)` with causal order inside the pass, so the runtime keeps the rows in
position order (compaction instead of a wrapping ring, runtime/responder/compact.py) and masks
the rest (window, evicted sinks never exist) through `attention_bias [1, 1, T, total]`.

RoPE is applied at the absolute `position_ids` (GroupQueryAttention's own rotary with its
`position_ids` input when q, k and v come packed from one projection, as llama's do after
`pack_parallel_matmuls`; `RotaryEmbedding` on the 3-D projections otherwise, e.g. qwen3's
normed q/k): the slot index is not the position once compaction has moved rows. Keys are cached
rotated, as in the row layout.

This is a rewrite of the traced graph (export/lm/graphs.py) found by its graph inputs and
outputs: per layer, the RoPE node producing `new_k_i`, the Transpose producing `new_v_i`, the
query that meets `k_i`, and the value product of `v_i` up to the reshape that feeds o_proj. A
graph that does not show this shape for every layer is left as it was (the caller keeps the
row layout)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KV_LAYOUT_ROWS = "ring_rows"  # new rows out, the runtime writes them into its ring
KV_LAYOUT_GQA = "gqa_inplace"  # GroupQueryAttention writes the rows into the bound buffer
KV_LAYOUTS = (KV_LAYOUT_ROWS, KV_LAYOUT_GQA)


def _uses(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def to_group_query_attention(model: onnx.ModelProto, layers: list[int], num_heads: int,
                             kv_heads: int, head_dim: int, scale: float) -> bool:
    """Rewrite, in place, the attention of `layers` (indices of `k_i`/`v_i`) to
    GroupQueryAttention; True when done. False (graph untouched) when any layer does not show
    the traced pattern."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    users = _uses(g)

    def op(name: str, kind: str) -> onnx.NodeProto | None:
        n = producer.get(name)
        return n if n is not None and n.op_type == kind else None

    def only(name: str, kind: str) -> onnx.NodeProto | None:
        # the one user of that kind (a Shape of the cache, for the old mask, may sit beside it)
        u = [n for n in users.get(name, []) if n.op_type != "Shape"]
        return u[0] if len(u) == 1 and u[0].op_type == kind else None

    plans = []
    for i in layers:
        rope_k = op(f"new_k_{i}", "RotaryEmbedding")
        t_k = rope_k and op(rope_k.input[0], "Transpose")
        t_v = op(f"new_v_{i}", "Transpose")
        t_past = only(f"k_{i}", "Transpose")
        scores = t_past and only(t_past.output[0], "MatMul")
        grouped = scores and op(scores.input[0], "Reshape")
        rope_q = grouped and op(grouped.input[0], "RotaryEmbedding")
        t_q = rope_q and op(rope_q.input[0], "Transpose")
        past_v = only(f"v_{i}", "MatMul")
        total = past_v and only(past_v.output[0], "Add")
        if not (t_k and t_v and t_q and total):
            return False
        last = total  # the [1, h, T, d] -> [1, T, h*d] reshapes before o_proj
        while True:
            nxt = users.get(last.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in ("Reshape", "Transpose"):
                break
            last = nxt[0]
        if last is total or last.op_type != "Reshape":
            return False
        plans.append((i, rope_q, t_q.input[0], t_k.input[0], t_v.input[0], last))

    flat = "gqa_flat_shape"  # [1, T, heads, d] -> [1, T, heads*d]
    g.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), flat))

    def three_d(x: str, name: str) -> tuple[list[onnx.NodeProto], str]:
        # a tensor reshaped straight from a 3-D projection is read before that reshape
        r = op(x, "Reshape")
        if r is not None and len(users.get(x, [])) == 1:
            return [], r.input[0]
        return [helper.make_node("Reshape", [x, flat], [name], name=name)], name

    def packed(xq: str, xk: str, xv: str) -> str | None:
        """The packed q|k|v projection when q, k and v are the three parts of one Split of it
        (read as 3-D straight from the Split): GroupQueryAttention then takes it whole."""
        parts = [three_d(x, "")[1] for x in (xq, xk, xv)]
        split = op(parts[0], "Split")
        if split is None or list(split.output) != parts or len(split.input) < 2:
            return None
        sizes = next((numpy_helper.to_array(t) for t in g.initializer
                      if t.name == split.input[1]), None)
        d = head_dim
        if sizes is None or sizes.tolist() != [num_heads * d, kv_heads * d, kv_heads * d]:
            return None
        return split.input[0]

    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for i, rope_q, xq, xk, xv, last in plans:
        cos, sin = rope_q.input[2], rope_q.input[3]
        attrs = {a.name: helper.get_attribute_value(a) for a in rope_q.attribute}
        qkv = packed(xq, xk, xv)
        if qkv is not None and not attrs.get("interleaved", 0):
            # one node: rotary inside, at the absolute `position_ids` (not the slot index)
            new_nodes[id(last)] = [helper.make_node(
                "GroupQueryAttention",
                [qkv, "", "", f"k_{i}", f"v_{i}", "seqlens_k", "total_sequence_length", cos,
                 sin, "position_ids", "attention_bias"],
                [last.output[0], f"present_k_{i}", f"present_v_{i}"], domain="com.microsoft",
                num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1,
                rotary_interleaved=0, name=f"gqa_{i}")]
            continue
        nodes: list[onnx.NodeProto] = []
        q_pre, q3 = three_d(xq, f"gqa_q3_{i}")
        k_pre, k3 = three_d(xk, f"gqa_k3_{i}")
        v_pre, v3 = three_d(xv, f"gqa_v3_{i}")
        nodes += q_pre + k_pre + v_pre
        for src, name in ((q3, f"gqa_q_rot_{i}"), (k3, f"gqa_k_rot_{i}")):
            nodes.append(helper.make_node("RotaryEmbedding", [src, "position_ids", cos, sin],
                                          [name], domain="com.microsoft", name=name, **attrs))
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [f"gqa_q_rot_{i}", f"gqa_k_rot_{i}", v3, f"k_{i}", f"v_{i}", "seqlens_k",
             "total_sequence_length", "", "", "", "attention_bias"],
            [last.output[0], f"present_k_{i}", f"present_v_{i}"], domain="com.microsoft",
            num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, name=f"gqa_{i}"))
        new_nodes[id(last)] = nodes
    kept = []
    for n in g.node:
        kept += new_nodes.get(id(n), [n])
    del g.node[:]
    g.node.extend(kept)

    # outputs: logits and the presents (the bound buffers); inputs: GQA's instead of the mask
    kv_type = {x.name: x for x in g.input}
    outs = [o for o in g.output if not o.name.startswith(("new_k_", "new_v_"))]
    for i in layers:
        for kv in "kv":
            t = onnx.ValueInfoProto()
            t.CopyFrom(kv_type[f"{kv}_{i}"])
            t.name = f"present_{kv}_{i}"
            outs.append(t)
    del g.output[:]
    g.output.extend(outs)
    token_axis = g.input[0].type.tensor_type.shape.dim[1].dim_param  # input_ids [1, T]
    g.input.extend([
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT,
                                      [1, 1, token_axis, "total"])])
    _drop_dead(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return True


def _drop_dead(model: onnx.ModelProto) -> None:
    """Nodes, inputs and initializers nothing reaches the outputs through."""
    g = model.graph
    need = {o.name for o in g.output}
    live = []
    for n in reversed(list(g.node)):
        if any(o in need for o in n.output):
            live.append(n)
            need.update(x for x in n.input if x)
    live.reverse()
    del g.node[:]
    g.node.extend(live)
    inputs = [x for x in g.input if x.name in need]
    del g.input[:]
    g.input.extend(inputs)
    for init in [x for x in g.initializer if x.name not in need]:
        g.initializer.remove(init)
