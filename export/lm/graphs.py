"""A decoder-only LM as one ONNX graph whose token axis is the only symbolic dimension: run with
1 token it is the decode step, with K tokens the prefill chunk (DESIGN.md section 2: one set of
weights, two sizes).

Inputs: `input_ids [1, T]`, `position_ids [1, T]` (absolute positions: RoPE is applied before the
rows are cached, so where a row sits in the ring does not matter), `attention_mask [1, 1, T, C]`
(additive, over the cache slots; the runtime builds it from its slot bookkeeping, so sinks, window
and rollback are all runtime decisions; the pass's own causal part is built in the graph) and
per attention layer `k_i`, `v_i [1, kv_heads, C, head_dim]`. Outputs: `logits [1, T, vocab]` and
only this pass's rows `new_k_i`, `new_v_i [1, kv_heads, T, head_dim]`; the runtime writes them
into its ring buffers. The cache is never copied through the graph.

The slot axis C is symbolic too (`slots` in the manifest, run at a few bucket sizes): a
conversation that has used few slots attends over a short buffer, and the runtime grows its
buffers to the next bucket as the conversation goes on (decode cost follows the used window, not
the capacity).

Transformers' own decoder layers run inside: `_RowCache` stands in for its Cache object (it
records this pass's rows and hands them back unchanged), and the attention itself is
`cached_rows_attention`, registered as an attention implementation for the trace: it scores the
queries against the cached rows and the pass's own rows separately, so the cache is never
concatenated with the new rows (a copy of every row, every layer, every step) nor expanded to the
query heads (grouped-query attention is a reshape of the queries instead). The explicit 4-D mask
means no mask factory is traced.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import AttentionInterface

from edgestream.export.onnx_export import save_model

ROW_ATTENTION = "edgestream_cached_rows"
# every LM weight goes to lm.onnx.data (threshold 0 bytes), never inline in lm.onnx: a graph
# over 2 GB needs it, and every LM bundle then has one layout (speed: one profile put the same
# MatMulNBits 3 to 5 % faster this way, a later decode run measured no difference)
LM_EXTERNAL = 0


class _RowCache:
    """What a layer sees as its cache during one traced pass. Attention: the cached rows (graph
    inputs) followed by this pass's rows, which are kept as graph outputs. Short convolutions
    (LFM2): the carried last k-1 inputs (a graph input) before this pass's inputs; the last k-1
    of those are the new carry (a `replace` state)."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 conv: dict[int, torch.Tensor]) -> None:
        self.past = past
        self.conv = conv
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.new_conv: dict[int, torch.Tensor] = {}

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.conv[layer_idx]

    def is_recording_past(self, layer_idx: int) -> bool:
        return True  # always the concatenating path: one graph for 1 and K tokens

    def update_conv_state(self, x: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs: object
                          ) -> torch.Tensor:
        full = torch.cat([self.conv[layer_idx], x], dim=-1)
        self.new_conv[layer_idx] = full[..., -self.conv[layer_idx].shape[-1]:]
        return full

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        # only this pass's rows: `cached_rows_attention` reads the cached ones from `past`
        self.new[layer_idx] = (key, value)
        return key, value


def cached_rows_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor, scaling: float,
                          dropout: float = 0.0, row_cache: _RowCache | None = None,
                          **kwargs: object) -> tuple[torch.Tensor, None]:
    """Softmax attention over the cached rows `[1, kv, C, d]` and this pass's rows `[1, kv, T,
    d]` (`key`, `value`) without joining them: the scores of both are joined instead (T x (C+T)
    per head, small). Queries `[1, h, T, d]` are grouped per KV head as `[1, kv, g*T, d]`."""
    past_k, past_v = row_cache.past[module.layer_idx]
    _, heads, t, d = query.shape
    kv = key.shape[1]
    g = heads // kv
    c = past_k.shape[2]
    q = query.reshape(1, kv, g * t, d)
    # the scale on each product (onnxruntime folds it into the MatMul as FusedMatMul's alpha)
    # and the mask repeated over the g query groups (rows g*t: one Tile shared by every layer)
    # rather than the scores reshaped around it: two fewer kernels per layer and step
    scores = torch.cat([torch.matmul(q, past_k.transpose(2, 3)) * scaling,
                        torch.matmul(q, key.transpose(2, 3)) * scaling], dim=3)
    scores = scores + attention_mask.reshape(1, 1, t, c + t).repeat(1, 1, g, 1)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.matmul(probs[..., :c], past_v) + torch.matmul(probs[..., c:], value)
    # [1, h, T, d] -> [1, T, h, d], the layout transformers' attention functions return
    return out.reshape(1, heads, t, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(ROW_ATTENTION, cached_rows_attention)


def slot_buckets(kv_slots: int, chunk_tokens: int) -> list[int]:
    """The slot-axis sizes the runtime runs at: the capacity and its halvings, down to four
    chunks (64 slots for SmolLM2's 16-token chunks)."""
    sizes = [kv_slots]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= 4 * chunk_tokens:
        sizes.append(sizes[-1] // 2)
    return sorted(sizes)


def layer_kinds(config: object) -> list[str]:
    """'attention' or 'conv' per layer (LFM2 mixes them; llama/qwen3 are all attention)."""
    types = getattr(config, "layer_types", None) or []
    n = config.num_hidden_layers
    return ["conv" if i < len(types) and types[i] == "conv" else "attention" for i in range(n)]


class DecoderLMGraph(nn.Module):
    """tokens + positions + mask + per-layer state -> logits + new rows / new carries, for
    llama, qwen3 and lfm2. State inputs in layer order: attention k, v; conv carry."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.kinds = layer_kinds(model.config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.model.model
        past, conv, j = {}, {}, 0
        for i, kind in enumerate(self.kinds):
            if kind == "attention":
                past[i], j = (states[j], states[j + 1]), j + 2
            else:
                conv[i], j = states[j], j + 1
        cache = _RowCache(past, conv)
        hidden = base.embed_tokens(input_ids)
        # own rows: causal within the pass (token j sees rows 0..j), built here so the mask
        # input has no derived dimension
        t = torch.arange(input_ids.shape[1], device=input_ids.device)
        own = torch.where(t.view(1, -1) <= t.view(-1, 1), 0.0, torch.finfo(hidden.dtype).min)
        attention_mask = torch.cat([attention_mask, own.view(1, 1, *own.shape).to(hidden.dtype)],
                                   dim=3)
        rope = base.rotary_emb(hidden, position_ids=position_ids)
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = ROW_ATTENTION  # for this pass only: parity runs eager
        try:
            for layer, kind in zip(base.layers, self.kinds):
                # conv layers read a mask as 2-D padding flags: they get none (no padding)
                mask = attention_mask if kind == "attention" else None
                hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                               cache=cache, position_embeddings=rope, row_cache=cache)
        finally:
            config._attn_implementation = before
        norm = base.norm if hasattr(base, "norm") else base.embedding_norm  # lfm2's final norm
        logits = self.model.lm_head(norm(hidden))
        out: list[torch.Tensor] = []
        for i, kind in enumerate(self.kinds):
            out += list(cache.new[i]) if kind == "attention" else [cache.new_conv[i]]
        return (logits, *out)


def fuse_norms(model: onnx.ModelProto) -> int:
    """Replace every traced RMSNorm (Pow 2, ReduceMean, Add eps, Sqrt, Reciprocal, Mul x, Mul
    weight: seven small kernels over the hidden state) by one SimplifiedLayerNormalization, and
    one that follows a residual Add by SkipSimplifiedLayerNormalization, which also returns the
    sum (onnxruntime's own kernels; the default graph optimizer does not match the Reciprocal
    form the exporter writes). Returns the number of norms fused. Parity runs on the result."""
    from onnx import helper, numpy_helper

    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def only_user(name: str, op: str):  # type: ignore[no-untyped-def]
        u = users.get(name, [])
        return u[0] if len(u) == 1 and u[0].op_type == op and name not in outputs else None

    def scalar(name: str, value: float | None = None) -> float | None:
        c = consts.get(name)
        if c is None or c.size != 1:
            return None
        v = float(c.reshape(-1)[0])
        return v if value is None or v == value else None

    drop, new_nodes, fused = set(), {}, 0
    for pw in g.node:
        if pw.op_type != "Pow" or scalar(pw.input[1], 2.0) is None:
            continue
        x = pw.input[0]
        mean = only_user(pw.output[0], "ReduceMean")
        add = mean and only_user(mean.output[0], "Add")
        sqrt = add and only_user(add.output[0], "Sqrt")
        rec = sqrt and only_user(sqrt.output[0], "Reciprocal")
        mul = rec and only_user(rec.output[0], "Mul")
        if not mul or x not in mul.input:
            continue
        axes = consts.get(mean.input[1]) if len(mean.input) > 1 else None
        eps = scalar(add.input[1]) if add.input[0] == mean.output[0] else scalar(add.input[0])
        if axes is None or list(axes.reshape(-1)) != [-1] or eps is None:
            continue
        scale = only_user(mul.output[0], "Mul")
        weight = scale and [i for i in scale.input if i != mul.output[0]]
        if not weight or weight[0] not in consts or consts[weight[0]].ndim != 1:
            continue
        chain = [pw, mean, add, sqrt, rec, mul, scale]
        residual = producer.get(x)
        sum_users = [u for u in users.get(x, []) if u is not pw and u is not mul]
        if residual is not None and residual.op_type == "Add" and sum_users and \
                all(i not in consts for i in residual.input):
            # the residual sum feeds this norm and the next residual: compute both at once
            node = helper.make_node("SkipSimplifiedLayerNormalization",
                                    [residual.input[0], residual.input[1], weight[0]],
                                    [scale.output[0], "", "", x], domain="com.microsoft",
                                    epsilon=eps, name=f"{scale.name}_skip_rms")
            drop.add(id(residual))
            new_nodes[id(residual)] = node
        else:
            node = helper.make_node("SimplifiedLayerNormalization", [x, weight[0]],
                                    [scale.output[0]], axis=-1, epsilon=eps,
                                    stash_type=1, name=f"{scale.name}_rms")
            new_nodes[id(pw)] = node
        drop.update(id(n) for n in chain)
        fused += 1
    if not fused:
        return 0
    kept = []
    for n in g.node:
        if id(n) in new_nodes:
            kept.append(new_nodes[id(n)])
        elif id(n) not in drop:
            kept.append(n)
    del g.node[:]
    g.node.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def pack_parallel_matmuls(model: onnx.ModelProto) -> int:
    """MatMuls that read one activation with constant 2-D weights (q, k and v; gate and up)
    become one MatMul over the weights joined along N, then a Split: one weight-streaming
    kernel instead of three (the later MatMulNBits quantizes per column block along K, so the
    joined weight quantizes to the same numbers). Returns the number of groups packed."""
    from onnx import helper, numpy_helper

    import numpy as np

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    groups: dict[str, list] = {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            groups.setdefault(n.input[0], []).append(n)
    replaced: dict[int, list] = {}
    drop: set[int] = set()
    packed = 0
    for source, nodes in groups.items():
        if len(nodes) < 2 or len({inits[n.input[1]].dims[0] for n in nodes}) != 1:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        name = f"{nodes[0].name or nodes[0].output[0]}_packed"
        g.initializer.append(numpy_helper.from_array(
            np.concatenate(weights, axis=1), f"{name}_weight"))
        g.initializer.append(numpy_helper.from_array(
            np.array([w.shape[1] for w in weights], "int64"), f"{name}_sizes"))
        first = min(nodes, key=lambda n: list(g.node).index(n))
        replaced[id(first)] = [
            helper.make_node("MatMul", [source, f"{name}_weight"], [f"{name}_out"], name=name),
            helper.make_node("Split", [f"{name}_out", f"{name}_sizes"],
                             [n.output[0] for n in nodes], axis=-1, name=f"{name}_split")]
        drop.update(id(n) for n in nodes)
        packed += 1
    if packed:
        kept = []
        for n in g.node:
            kept += replaced.get(id(n), []) if id(n) in drop else [n]
        del g.node[:]
        g.node.extend(kept)
        used = {i for n in g.node for i in n.input}
        unused = [i for i in g.initializer if i.name not in used]
        for i in unused:
            g.initializer.remove(i)
    return packed


MAX_ROPE_CACHE = 1 << 16  # positions; a longer model keeps the traced RoPE (no large table)


def fuse_rope(model: onnx.ModelProto, max_position: int) -> int:
    """Replace the traced rotate-half RoPE of q and k (Mul by cos, two Slices, Neg, Concat, Mul
    by sin, Add: seven kernels per tensor per layer) by onnxruntime's RotaryEmbedding over
    cos/sin tables of every position the model takes. Only the exact pattern with a full
    rotary dimension and cos/sin computed from `position_ids` and `inv_freq` is fused."""
    import numpy as np
    from onnx import helper, numpy_helper

    if max_position > MAX_ROPE_CACHE:
        return 0
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def op(name: str, kind: str):  # type: ignore[no-untyped-def]
        n = producer.get(name)
        return n if n is not None and n.op_type == kind else None

    def table(unsq: onnx.NodeProto | None, kind: str):  # type: ignore[no-untyped-def]
        """inv_freq behind Unsqueeze(Cos|Sin(Concat(f, f)), f = Mul(Cast(Unsqueeze(ids)), inv))"""
        trig = unsq is not None and op(unsq.input[0], kind)
        cat = trig and op(trig.input[0], "Concat")
        if not cat or len(cat.input) != 2 or cat.input[0] != cat.input[1]:
            return None
        mul = op(cat.input[0], "Mul")
        cast = mul and op(mul.input[0], "Cast")
        ids = cast and op(cast.input[0], "Unsqueeze")
        if not ids or ids.input[0] != "position_ids" or mul.input[1] not in consts:
            return None
        return mul.input[1]

    fused, drop, new_nodes, caches = 0, set(), {}, {}
    for add in g.node:
        if add.op_type != "Add":
            continue
        m1, m2 = op(add.input[0], "Mul"), op(add.input[1], "Mul")
        if not m1 or not m2:
            continue
        cat = op(m2.input[0], "Concat")
        neg = cat and op(cat.input[0], "Neg")
        hi = neg and op(neg.input[0], "Slice")
        lo = cat and len(cat.input) == 2 and op(cat.input[1], "Slice")
        x = m1.input[0]
        if not hi or not lo or hi.input[0] != x or lo.input[0] != x:
            continue
        inv_c = table(op(m1.input[1], "Unsqueeze"), "Cos")
        inv_s = table(op(m2.input[1], "Unsqueeze"), "Sin")
        n = consts[inv_c].size if inv_c else -1  # half the head size for a full rotary dim

        def at(node: onnx.NodeProto, i: int) -> int | None:
            c = consts.get(node.input[i]) if len(node.input) > i else None
            return int(c.reshape(-1)[0]) if c is not None and c.size == 1 else None

        if inv_c is None or inv_c != inv_s or (at(lo, 1), at(lo, 2), at(hi, 1)) != (0, n, n) \
                or at(lo, 3) not in (-1, 3) or at(hi, 3) not in (-1, 3):
            continue
        if inv_c not in caches:
            freqs = np.arange(max_position, dtype=np.float32)[:, None] * \
                consts[inv_c].astype(np.float32)[None, :]
            caches[inv_c] = (f"{inv_c}_cos_cache", f"{inv_c}_sin_cache")
            g.initializer.extend([numpy_helper.from_array(np.cos(freqs), caches[inv_c][0]),
                                  numpy_helper.from_array(np.sin(freqs), caches[inv_c][1])])
        new_nodes[id(add)] = helper.make_node(
            "RotaryEmbedding", [x, "position_ids", *caches[inv_c]], [add.output[0]],
            domain="com.microsoft", interleaved=0, name=f"{add.name or add.output[0]}_rope")
        drop.update(id(n) for n in (m1, m2, cat, neg, hi, lo))
        fused += 1
    if fused:
        kept = [new_nodes.get(id(n), n) for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(kept)
        used = {i for n in g.node for i in n.input}
        dead = True
        while dead:  # the traced cos/sin chains are left without users
            dead = [n for n in g.node if n.output and all(o not in used for o in n.output)
                    and not set(n.output) & {o.name for o in g.output}]
            for n in dead:
                g.node.remove(n)
            used = {i for n in g.node for i in n.input}
        for i in [i for i in g.initializer if i.name not in used]:
            g.initializer.remove(i)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def optimize_graph_file(path: Path, max_position: int) -> dict[str, int]:
    """The graph passes above on an exported graph file, in place."""
    model = onnx.load(str(path))
    done = {"norms_fused": fuse_norms(model), "matmuls_packed": pack_parallel_matmuls(model),
            "ropes_fused": fuse_rope(model, max_position)}
    save_model(model, path, LM_EXTERNAL)
    return done
