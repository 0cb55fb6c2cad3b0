"""torch -> ONNX for one graph (dynamo exporter, opset 18), and its manifest entry.

Every dimension is static except, where a recipe asks for it, a named token axis that the runtime
runs at exactly the sizes the manifest lists (DESIGN.md section 2: one decoder graph serves the
one-token step and the K-token block, so its weights are stored once). A graph whose weights pass
`external_threshold` bytes is written with its initializers in `<file>.data` beside it: protobuf
cannot hold a file over 2 GB, and the manifest hashes that file too.
"""

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
# protobuf's hard limit is 2 GiB per file; stay clear of it (the graph itself takes some room)
EXTERNAL_THRESHOLD = 1_800_000_000
_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
}


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in the proto (external ones excluded)."""
    return sum(len(i.raw_data) or i.ByteSize() for i in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path, external_threshold: int | None = None) -> None:
    """Write `model` to `path`; initializers go to `<name>.data` when they exceed the threshold
    (default `EXTERNAL_THRESHOLD`, read at call time). A stale data file of an earlier save is
    removed first so it cannot linger unhashed."""
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)
    limit = EXTERNAL_THRESHOLD if external_threshold is None else external_threshold
    large = weight_bytes(model) > limit
    # small tensors (shapes for Reshape) stay inline: shape inference must read them
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=data.name if large else None, size_threshold=1024)
    if data.is_file():
        # onnx creates the data file owner-only (0600); a device service running as another
        # user must read the weights as it reads the graph file
        data.chmod(path.stat().st_mode & 0o777)


def _rename_dims(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """The exporter calls symbolic dims s0, s27, ...; give them the recipe's names."""
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.dim_param = names[d.dim_param]


def export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                 input_names: list[str], output_names: list[str],
                 dynamic: dict[str, tuple[int, str, int]] | None = None,
                 external_threshold: int | None = None) -> None:
    """Export `module(*args)` to `path`. `dynamic`: {input name: (axis, dim name, max size)} for
    the (few) axes left symbolic; every other dimension is fixed by `args`."""
    module.eval()
    dynamic = dynamic or {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model: torch.nn.Module | torch.export.ExportedProgram = module
            if dynamic:
                dims = {name: torch.export.Dim(name, min=1, max=size)
                        for _, name, size in dynamic.values()}
                shapes = tuple({dynamic[n][0]: dims[dynamic[n][1]]} if n in dynamic else None
                               for n in input_names[:len(args)])
                # torch.onnx.export turns tuples of dynamic shapes into lists, which
                # torch.export then refuses for *args; export the program first
                model = torch.export.export(module, args, dynamic_shapes=_nest(module, shapes))
            program = torch.onnx.export(model, args, dynamo=True, opset_version=OPSET,
                                        input_names=input_names, output_names=output_names,
                                        optimize=True, verbose=False)
        except Exception as e:  # the exporter raises many internal types; report which graph
            raise ExportError(f"torch.onnx.export failed for {path.name}: {e}") from e
    proto = program.model_proto
    if dynamic:
        symbols = {}
        for n, (axis, name, _) in dynamic.items():
            v = next(v for v in proto.graph.input if v.name == n)
            symbols[v.type.tensor_type.shape.dim[axis].dim_param] = name
        _rename_dims(proto, symbols)
    save_model(proto, path, external_threshold)
    log.info("exported %s (%.1f MB)", path.name, path.stat().st_size / 1e6)


def _nest(module: torch.nn.Module, shapes: tuple) -> dict:
    """Dynamic shapes by parameter name, a `*states` parameter getting one tuple of the rest."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    out: dict = {}
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            out[p.name] = tuple(shapes[i:])
            break
        out[p.name] = shapes[i]
    return out


def external_files(path: Path) -> list[str]:
    """The external-data files a graph file refers to (relative to its folder)."""
    model = onnx.load(str(path), load_external_data=False)
    found = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loc = next(e.value for e in init.external_data if e.key == "location")
            if loc not in found:
                found.append(loc)
    return found


def graph_entry(name: str, path: Path, precision: str = "fp32",
                sizes: dict[str, list[int]] | None = None) -> dict:
    """The manifest's description of an exported graph, read back from the file itself.
    `sizes`: for each symbolic dim the graph has, the exact sizes the runtime runs it at."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    sizes = sizes or {}

    def spec(values) -> list[dict]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else d.dim_param
                                     for d in t.shape.dim]
            bad = [d for d in dims if (isinstance(d, str) and d not in sizes) or d == 0]
            if bad:
                raise ExportError(f"{path.name}: {v.name} has a dynamic dimension {dims}; "
                                  "every bundle tensor must be static or a named token axis")
            out.append({"name": v.name, "dtype": _DTYPES[t.elem_type], "shape": dims})
        return out

    entry = {"name": name, "file": path.name, "precision": precision,
             "inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}
    if sizes:
        entry["dims"] = {k: list(v) for k, v in sizes.items()}
    return {**entry, **file_hashes(path)}


def file_hashes(path: Path) -> dict:
    """The manifest fields that pin a graph file's bytes: its sha256 and, when it keeps its
    weights outside, each external-data file's."""
    out: dict = {"sha256": sha256_file(path)}
    data = external_files(path)
    if data:
        out["external_data"] = [{"file": f, "sha256": sha256_file(path.parent / f)}
                                for f in data]
    return out


def graph_bytes(path: Path) -> int:
    """A graph's size on disk, its external-data files included."""
    return path.stat().st_size + sum((path.parent / f).stat().st_size
                                     for f in external_files(path))
