"""Whisper graphs rewritten onto onnxruntime's fused operators (export/whisper/fusion.py): the fused
operators are really there, the fused graphs compute what the unfused ones do (onnxruntime runs
both, tiny random Whisper; the decoder at several positions, its self-attention reading only the
cache rows before `position`), and an attention whose reshapes are not the head split is left
alone."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgestream.export.whisper.fusion import fuse_file, fuse_model
from onnx import TensorProto, helper, numpy_helper


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def unfused(tiny_whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Whisper's encoder and decoder as exported, before any fusion."""
    from edgestream.export.sources import resolve
    from edgestream.export.whisper.recipe import export_whisper_graphs, load_whisper

    out = tmp_path_factory.mktemp("unfused")
    export_whisper_graphs(load_whisper(resolve(str(tiny_whisper_dir))), out, fuse=False)
    return out


def _decoder_feeds(sess: ort.InferenceSession, tokens: int, position: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "tokens":
            feeds[i.name] = rng.integers(0, 50000, (1, tokens)).astype(np.int64)
        elif i.name == "position":
            feeds[i.name] = np.array([position], np.int64)
        elif i.name == "timestamp_state":
            feeds[i.name] = np.tile(np.array([[1, -1]], np.int64), (1, tokens, 1))
        else:  # self and cross K/V
            feeds[i.name] = rng.standard_normal(i.shape).astype(np.float32)
    return feeds


def test_fused_graphs_match_unfused(unfused: Path, tmp_path: Path) -> None:
    for g in ("encoder", "decoder"):
        shutil.copy(unfused / f"{g}.onnx", tmp_path / f"{g}.onnx")
    enc, dec = fuse_file(tmp_path / "encoder.onnx"), fuse_file(tmp_path / "decoder.onnx")
    # 2 layers: encoder GELU after both convolutions and in both MLPs, both self-attentions;
    # decoder GELU in both MLPs, self- and cross-attention of both layers
    assert (enc.gelu, enc.attention, dec.gelu, dec.attention) == (4, 2, 2, 4)
    assert (enc.trimmed, dec.trimmed) == (0, 2)  # decoder self-attention: cache up to position
    ops = {g: _ops(tmp_path / f"{g}.onnx") for g in ("encoder", "decoder")}
    assert ops["encoder"]["MultiHeadAttention"] == 2 and ops["encoder"]["Gelu"] == 4
    assert ops["decoder"]["MultiHeadAttention"] == 4 and ops["decoder"]["Gelu"] == 2
    for g, count in ops.items():  # nothing of the unfused patterns is left
        assert count["Erf"] == 0 and count["Softmax"] == 0, (g, count)

    rng = np.random.default_rng(0)
    mel = (rng.standard_normal((1, 80, 3000)) * 0.5).astype(np.float32)
    ref = _session(unfused / "encoder.onnx").run(None, {"mel": mel})
    got = _session(tmp_path / "encoder.onnx").run(None, {"mel": mel})
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * max(1.0, float(np.abs(a).max())))
    plain, fused = _session(unfused / "decoder.onnx"), _session(tmp_path / "decoder.onnx")
    names = [o.name for o in plain.get_outputs()]
    # the step and the block; the caches are random past `position` too, where the unfused
    # graph masks them and the fused one must not read them
    for tokens, position in ((1, 0), (1, 23), (1, 63), (16, 5), (16, 48)):
        feeds = _decoder_feeds(plain, tokens, position, rng)
        for name, a, b in zip(names, plain.run(None, feeds), fused.run(None, feeds)):
            if a.dtype.kind == "f":
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-4, err_msg=name)
            else:  # the greedy head's choices
                np.testing.assert_array_equal(b, a, err_msg=name)


HEADS, HEAD_DIM, ROWS = 4, 8, 12


def _attention_graph(k_split: list[int], k_perm: list[int]) -> onnx.ModelProto:
    """x [1, S, D] -> Q, K, V projections, head split (reshape + transpose), Q K^T, Softmax, P V,
    head merge. K is reshaped to `k_split` and transposed by `k_perm` ([1, S, H, Dh] and
    [0, 2, 3, 1] are the head split with K transposed for the product)."""
    rng = np.random.default_rng(3)
    d = HEADS * HEAD_DIM
    inits = [numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32) / 4, n)
             for n in ("wq", "wk", "wv")]
    inits += [numpy_helper.from_array(np.array([1, ROWS, HEADS, HEAD_DIM], np.int64), "split"),
              numpy_helper.from_array(np.array(k_split, np.int64), "k_split"),
              numpy_helper.from_array(np.array([1, ROWS, d], np.int64), "merge")]
    nodes = []
    for p, perm in (("q", [0, 2, 1, 3]), ("k", k_perm), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}2"]),
                  helper.make_node("Reshape", [f"{p}2", "k_split" if p == "k" else "split"],
                                   [f"{p}4"]),
                  helper.make_node("Transpose", [f"{p}4"], [f"{p}h"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge"], ["out"])]
    graph = helper.make_graph(nodes, "attn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS, d])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_head_split_attention_is_fused_exactly(tmp_path: Path) -> None:
    model = _attention_graph([1, ROWS, HEADS, HEAD_DIM], [0, 2, 3, 1])
    onnx.save(model, str(tmp_path / "plain.onnx"))
    counts = fuse_model(model)
    assert counts.attention == 1
    assert [n.op_type for n in model.graph.node].count("MultiHeadAttention") == 1
    onnx.save(model, str(tmp_path / "fused.onnx"))
    x = np.random.default_rng(4).standard_normal((1, ROWS, HEADS * HEAD_DIM)).astype(np.float32)
    a = _session(tmp_path / "plain.onnx").run(None, {"x": x})[0]
    b = _session(tmp_path / "fused.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_other_layouts_are_left_alone() -> None:
    # K's channels split head-interleaved ([1, S, Dh, H]) and transposed to [1, H, Dh, S]: the
    # shapes of the head split, but another computation, which must not become MHA
    model = _attention_graph([1, ROWS, HEAD_DIM, HEADS], [0, 3, 2, 1])
    before = [n.op_type for n in model.graph.node]
    assert fuse_model(model).attention == 0
    assert [n.op_type for n in model.graph.node] == before
