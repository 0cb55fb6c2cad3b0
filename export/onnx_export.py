"""torch -> ONNX for one fixed-shape graph (dynamo exporter, opset 18), and its manifest entry."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from edgestream.export.errors import ExportError
from edgestream.runtime.bundle import sha256_file

log = logging.getLogger(__name__)

OPSET = 18
_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
}


def export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                 input_names: list[str], output_names: list[str]) -> None:
    """Export `module(*args)` with static shapes to a single ONNX file at `path`."""
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                                        input_names=input_names, output_names=output_names,
                                        optimize=True, verbose=False)
        except Exception as e:  # the exporter raises many internal types; report which graph
            raise ExportError(f"torch.onnx.export failed for {path.name}: {e}") from e
    program.save(str(path), external_data=False)
    log.info("exported %s (%.1f MB)", path.name, path.stat().st_size / 1e6)


def graph_entry(name: str, path: Path, precision: str = "fp32") -> dict:
    """The manifest's description of an exported graph, read back from the file itself."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def spec(values) -> list[dict]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
            if any(d <= 0 for d in dims):
                raise ExportError(f"{path.name}: {v.name} has a dynamic dimension {dims}; "
                                  "every bundle tensor must be static")
            out.append({"name": v.name, "dtype": _DTYPES[t.elem_type], "shape": dims})
        return out

    return {"name": name, "file": path.name, "sha256": sha256_file(path), "precision": precision,
            "inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}
