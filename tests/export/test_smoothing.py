"""SmoothQuant-style rescaling (`export.smoothing`, the probe's alternative to blockwise int8):
folding s into a LayerNorm's gamma and beta and into the weight rows that read it leaves the fp32
graph's outputs unchanged, and moves the activation's outlier channel into the weights. The
reference is the same graph before the rewrite, run by onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgestream.export.smoothing import activation_maxima, smooth_layer_norms, smooth_targets

D, N = 64, 48


def _graph(rng: np.random.Generator) -> onnx.ModelProto:
    gamma = np.ones(D, np.float32)
    gamma[5] = 40.0  # one huge hidden dimension after the norm
    inits = [numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal((D, N)).astype(np.float32) * 0.1, "wq"),
             numpy_helper.from_array(rng.standard_normal((D, N)).astype(np.float32) * 0.1, "wk")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1,
                              name="norm"),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", D])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["t", N]) for n in ("q", "k")],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_smoothing_is_exact_in_fp32_and_flattens_the_outlier() -> None:
    rng = np.random.default_rng(0)
    model = _graph(rng)
    x = rng.standard_normal((16, D)).astype(np.float32)
    before = _run(model, x)
    targets = smooth_targets(model)
    assert [(t.norm, t.weights) for t in targets] == [("norm", ("wq", "wk"))]
    maxima = activation_maxima(model, ({"x": x},), ["h"])
    assert smooth_layer_norms(model, maxima, alpha=0.5) == 1
    after = _run(model, x)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # the activation's largest channel over its median: about 20x before; alpha 0.5 moves half
    # of it (in log scale) into the weights
    smoothed = activation_maxima(model, ({"x": x},), ["h"])["h"]
    ratio = maxima["h"].max() / np.median(maxima["h"])
    assert ratio > 10
    assert smoothed.max() / np.median(smoothed) < ratio / 2


def test_a_tied_weight_is_left_alone() -> None:
    model = _graph(np.random.default_rng(1))
    assert smooth_targets(model, skip=frozenset({"wk"})) == []
