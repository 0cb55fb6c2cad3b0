"""int8 Whisper: the encoder's attention output projections stay fp32 (their 1500-frame input is
where one activation scale per tensor fits worst), every other weight MatMul is int8, and the
decoder is int8 throughout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from edgestream.export.quantize import quantize_graphs
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.session import SessionConfig

ENCODER_LAYERS = 2  # tests/conftest.py's tiny Whisper config


def _weight_matmuls(model: onnx.ModelProto) -> dict[str, list[str]]:
    """{op type: [activation input]} of the MatMul/MatMulInteger nodes reading an initializer."""
    inits = {i.name for i in model.graph.initializer}
    found: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "MatMulInteger") and n.input[1] in inits:
            found.setdefault(n.op_type, []).append(n.input[0])
    return found


def test_int8_keeps_encoder_attention_out_fp32(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_bundle, tmp_path / "int8"))
    manifest = json.loads((folder / "manifest.json").read_text())
    out = quantize_graphs(folder, manifest, ("encoder", "decoder"))
    (folder / "manifest.json").write_text(json.dumps(out, indent=2) + "\n")

    encoder = onnx.load(str(folder / "encoder.onnx"))
    producer = {o: n for n in encoder.graph.node for o in n.output}
    inits = {i.name: i for i in encoder.graph.initializer}
    fp32 = _weight_matmuls(encoder).get("MatMul", [])
    # one per encoder layer, each reading a fused attention's output, with an fp32 weight
    assert len(fp32) == ENCODER_LAYERS
    assert all(producer[x].op_type == "MultiHeadAttention" for x in fp32)
    fp32_weights = [inits[n.input[1]] for n in encoder.graph.node
                    if n.op_type == "MatMul" and n.input[1] in inits]
    assert all(w.data_type == TensorProto.FLOAT for w in fp32_weights)
    # q, k, v, fc1, fc2 per layer and the decoder's cross K/V projections stay int8
    assert len(_weight_matmuls(encoder)["MatMulInteger"]) >= 5 * ENCODER_LAYERS

    decoder = onnx.load(str(folder / "decoder.onnx"))
    assert "MatMul" not in _weight_matmuls(decoder)

    # the bundle is valid and its encoder runs
    engine = WhisperEngine(Bundle.open(folder, SessionConfig("cpu")))
    engine.encode(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1)
    assert np.isfinite(engine.step(engine.prompt[0], 0)).all()
