"""Why int8 Whisper quantizes some weights blockwise (`quantize.BLOCKWISE_INT8`): with an outlier
channel in the activation, one int8 scale per tensor (dynamic MatMulInteger) leaves the other
channels a few levels, while 8-bit MatMulNBits at accuracy level 4 quantizes the activation per
block of 32 values of each row, so the outlier costs only its own block and every row is
quantized on its own (a one-token step gives the rows of a K-token block). Reference: numpy's
fp32 product of the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgestream.export.quantize import quantize_file

K, N, ROWS = 256, 64, 16


def _matmul(path: Path, weight: np.ndarray) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", N])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def test_blockwise_int8_isolates_an_outlier_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    x = rng.standard_normal((ROWS, K)).astype(np.float32)
    x[:, 7] *= 60.0  # one huge hidden dimension, as Whisper's hidden states have
    x[0] *= 8.0  # and one row far louder than the others (a block's first token)
    expected = x.astype(np.float64) @ weight.astype(np.float64)

    dynamic, blockwise = tmp_path / "dynamic.onnx", tmp_path / "blockwise.onnx"
    _matmul(dynamic, weight)
    _matmul(blockwise, weight)
    quantize_file(dynamic, "int8")
    info = quantize_file(blockwise, "int8", blockwise="layers")
    assert info["blockwise_int8"] == 1
    assert "MatMulInteger" in [n.op_type for n in onnx.load(str(dynamic)).graph.node]
    nodes = onnx.load(str(blockwise)).graph.node
    assert [n.op_type for n in nodes] == ["MatMulNBits"]
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert (attrs["bits"], attrs["accuracy_level"], attrs["block_size"]) == (8, 4, 32)

    def rel(y: np.ndarray, rows: slice = slice(1, None)) -> float:
        """Relative RMS error on the quiet rows (the ones one scale per tensor starves)."""
        d = y[rows] - expected[rows]
        return float(np.sqrt((d ** 2).sum() / (expected[rows] ** 2).sum()))

    err_dynamic, err_blockwise = rel(_run(dynamic, x)), rel(_run(blockwise, x))
    print(f"quiet rows, relative RMS error: dynamic {err_dynamic:.4f}, blockwise "
          f"{err_blockwise:.4f}")
    assert err_blockwise < 0.02, err_blockwise
    assert err_blockwise * 5 < err_dynamic, (err_blockwise, err_dynamic)

    # rows are quantized on their own: a row alone (a step) gives what it gave in the block
    block = _run(blockwise, x)
    steps = np.concatenate([_run(blockwise, x[i: i + 1]) for i in range(ROWS)])
    assert np.abs(block - steps).max() <= 1e-4 * np.abs(block).max()
    block_d = _run(dynamic, x)
    steps_d = np.concatenate([_run(dynamic, x[i: i + 1]) for i in range(ROWS)])
    assert np.abs(block_d - steps_d).max() > 1e-2 * np.abs(block_d).max()  # one scale: not so
