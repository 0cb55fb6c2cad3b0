"""The tiny graph `edgestream doctor` runs on every provider (runtime/assets/doctor.onnx).

Conv (cuDNN on CUDA), Relu, MatMul (cuBLAS), Add, Softmax: the kernels a speech bundle needs,
so a provider whose libraries are missing fails here as it would on the first utterance. The
weights are a fixed formula (runtime/doctor.py), so the device computes the expected output
with numpy.
Rebuild: `python -m edgestream.export.doctor_graph` (a test checks the shipped file matches).
"""

from __future__ import annotations

from pathlib import Path

from edgestream.runtime.doctor import doctor_weights as weights

OUT = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "doctor.onnx"


def build() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = weights()
    nodes = [
        helper.make_node("Conv", ["x", "conv"], ["c"], pads=[1, 1]),  # [1, 8, 16]
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),  # [1, 16, 8]
        helper.make_node("MatMul", ["t", "proj"], ["m"]),  # [1, 16, 10]
        helper.make_node("Add", ["m", "bias"], ["a"]),
        helper.make_node("Softmax", ["a"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "edgestream_doctor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 10])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edgestream")
    model.ir_version = 8  # readable by onnxruntime 1.14 and newer (old JetPack wheels)
    onnx.checker.check_model(model)
    return model.SerializeToString()


if __name__ == "__main__":
    OUT.write_bytes(build())
    print(f"wrote {OUT}")
