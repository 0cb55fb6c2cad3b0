"""Precisions per graph: the quantized embedding gather reads the projection's own quantized
bytes (checked against onnxruntime's own dequantizing operators), MatMulNBits keeps a K-token
block and a one-token step in agreement (exact re-scoring) for Whisper and moonshine_streaming,
fp16 halves the size, and bad precisions are refused before anything is exported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgestream.export.build import ExportOptions, export_bundle
from edgestream.export.errors import ExportError
from edgestream.export.gate import precision_plan
from edgestream.export.quantize import QuantizeError, quantize_file, quantize_graphs
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.session import SessionConfig

V, D = 300, 64
CPU = SessionConfig("cpu")


def _tied_graph(path: Path) -> np.ndarray:
    """Gather(emb, tok) -> x (also an output) and logits = x @ emb^T, like Whisper's decoder."""
    emb = np.random.default_rng(0).standard_normal((V, D)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "tok"], ["x"]),
         helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "emb_t"], ["logits"])], "tied",
        [helper.make_tensor_value_info("tok", TensorProto.INT64, [1, "T"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", D]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "T", V])],
        [numpy_helper.from_array(emb, "emb")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return emb


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def _dequantized_by_ort(model: onnx.ModelProto) -> np.ndarray:
    """The projection's weights `[V, D]` as onnxruntime's own kernels dequantize them:
    DequantizeLinear for MatMulInteger weights, MatMulNBits (fp32 compute) on the identity."""
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type in ("MatMulInteger", "MatMulNBits"))
    if node.op_type == "MatMulInteger":
        q = inits[node.input[1]]
        scale = next(i for n, i in inits.items() if n.endswith(".transposed_scale"))
        zero = inits[node.input[3]]
        g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"],
                                                axis=1)], "dq", [],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(numpy_helper.to_array(q), "q"),
                               numpy_helper.from_array(numpy_helper.to_array(scale), "s"),
                               numpy_helper.from_array(numpy_helper.to_array(zero), "z")])
        return _run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), {})[0].T
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs["accuracy_level"] = 0  # fp32 compute: the identity passes unquantized
    g = helper.make_graph(
        [helper.make_node("MatMulNBits", ["a", "b", "s"], ["w"], domain="com.microsoft", **attrs)],
        "nb", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [D, D])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [D, V])],
        [numpy_helper.from_array(numpy_helper.to_array(inits[node.input[1]]), "b"),
         numpy_helper.from_array(numpy_helper.to_array(inits[node.input[2]]), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                            helper.make_opsetid("com.microsoft", 1)])
    return _run(m, {"a": np.eye(D, dtype=np.float32)})[0].T


@pytest.mark.parametrize("precision", ["int8", "int4", "int8-nbits"])
def test_embedding_gather_reads_the_quantized_projection(precision: str, tmp_path: Path) -> None:
    path = tmp_path / "g.onnx"
    emb = _tied_graph(path)
    info = quantize_file(path, precision, block_size=16)
    assert info["quantized_gathers"] == 1 and info["fp32_matmul_weights"] == []
    model = onnx.load(str(path))
    fp32 = [tuple(i.dims) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT]
    assert (V, D) not in fp32 and (D, V) not in fp32  # no fp32 vocabulary table is left
    assert "Gather" in {n.op_type for n in model.graph.node}
    tok = np.array([[0, 7, 299, 7, 150]], np.int64)
    x = _run(model, {"tok": tok})[0]
    w = _dequantized_by_ort(model)
    np.testing.assert_allclose(x[0], w[tok[0]], rtol=0, atol=1e-6)
    # and the quantization is real but close: 8-bit within 1 %, 4-bit within 15 % of the weight
    err = np.abs(w - emb).max() / np.abs(emb).max()
    assert 0 < err < (0.15 if precision == "int4" else 0.01)


def test_exact_8bit_is_two_4bit_halves_of_the_same_weights(tmp_path: Path) -> None:
    """int8-nbits in a graph run at several token counts: each 8-bit weight becomes two 4-bit
    MatMulNBits with fp32 activations. The weights are the same 8-bit values (the tied gather
    returns the same rows to the bit as onnxruntime's own 8-bit weight, and the projection the
    same logits up to fp32 summation order), no 8-bit table is left, the weights take no more bytes."""
    plain, split = tmp_path / "plain.onnx", tmp_path / "split.onnx"
    _tied_graph(plain)
    _tied_graph(split)
    quantize_file(plain, "int8-nbits", block_size=16)
    info = quantize_file(split, "int8-nbits", block_size=16, exact_rows=True)
    assert info["quantized_gathers"] == 1 and info["fp32_matmul_weights"] == []
    model = onnx.load(str(split))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert len(nbits) == 2 and all(a["bits"] == 4 and a["accuracy_level"] == 1 for a in attrs)
    assert not [i for i in model.graph.initializer if i.name.endswith("_Q8")]
    def weight_bytes(m: onnx.ModelProto) -> int:
        return sum(numpy_helper.to_array(i).nbytes for i in m.graph.initializer)

    assert weight_bytes(model) <= 1.05 * weight_bytes(onnx.load(str(plain)))
    tok = np.array([[0, 7, 299, 7, 150]], np.int64)
    x8, logits8 = _run(onnx.load(str(plain)), {"tok": tok})
    x, logits = _run(model, {"tok": tok})
    assert np.array_equal(x, x8)
    # the plain graph quantizes its activations to int8 (accuracy level 4): compare with the
    # fp32 product of the same 8-bit weights instead
    w = _dequantized_by_ort(onnx.load(str(plain)))
    np.testing.assert_allclose(logits[0], x8[0] @ w.T, rtol=0, atol=1e-4)
    assert np.abs(logits - logits8).max() > 0  # and the plain one really is another kernel


def _block_vs_steps(engine, seq: list[int]) -> float:  # type: ignore[no-untyped-def]
    k = engine.block_size
    block = engine.block(seq + [0] * (k - len(seq)), 0)[: len(seq)]
    steps = np.stack([engine.step(t, i) for i, t in enumerate(seq)])
    return float(np.abs(block - steps).max())


def _variant(src: Path, dst: Path, plan: dict[str, str], block: int = 32) -> Path:
    shutil.copytree(src, dst)
    data = quantize_graphs(dst, json.loads((dst / "manifest.json").read_text()), plan,
                           block_size=block)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_whisper_nbits_block_and_step_agree(tiny_bundle: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """MatMulNBits with fp32 activations in a multi-size graph: a 16-token block and 16 single
    steps give the same logits, so re-scoring stays exact. Dynamic int8 (one activation scale per
    tensor, shared by a block's rows) does not; Whisper's int8, whose decoder is blockwise 8-bit
    with each row's activations quantized on their own (`quantize.BLOCKWISE_INT8`), comes closer
    but is not exact either."""
    from edgestream.export import quantize

    audio = np.random.default_rng(3).standard_normal(16000).astype(np.float32) * 0.1
    seq = [50257, 50362, 440, 1332, 995, 13, 3290, 262, 2068, 11, 290, 13]
    diffs = {}
    for precision in ("int4", "int8-nbits", "int8", "int8 dynamic"):
        if precision == "int8 dynamic":
            monkeypatch.setattr(quantize, "BLOCKWISE_INT8", {})
        root = _variant(tiny_bundle, tmp_path / precision.replace(" ", "_"),
                        {"decoder": precision.split()[0]})
        engine = WhisperEngine(Bundle.open(root, CPU))
        engine.encode(audio)
        diffs[precision] = _block_vs_steps(engine, seq)
    print(f"16-token block vs steps, max logit difference: {diffs}")
    assert diffs["int4"] <= 1e-4 and diffs["int8-nbits"] <= 1e-4, diffs
    assert diffs["int8 dynamic"] > 1e-3, diffs
    assert diffs["int8"] < diffs["int8 dynamic"], diffs


def test_moonshine_nbits_block_and_step_agree(tiny_moonshine_bundle: Path,
                                              tmp_path: Path) -> None:
    from conftest import speech_dir

    from edgestream.runtime.audio.wav import read_wav, to_mono

    audio = to_mono(read_wav(speech_dir() / "arctic_a0009.wav").samples)[:16000]
    sizes = {}
    for precision in ("int4", "int8-nbits"):
        root = _variant(tiny_moonshine_bundle, tmp_path / precision,
                        {"encoder": precision, "memory": precision, "decoder": precision},
                        block=16)
        engine = StreamingEncDecEngine(Bundle.open(root, CPU))
        for start in range(0, audio.size - engine.chunk + 1, engine.chunk):
            engine.push(audio[start: start + engine.chunk].astype(np.float32))
        engine.flush()
        assert engine.memory_length > 0
        assert _block_vs_steps(engine, [1, 5, 9, 12, 30, 7, 7, 41]) <= 1e-4, precision
        sizes[precision] = (root / "decoder.onnx").stat().st_size
    assert sizes["int4"] < sizes["int8-nbits"] < (tiny_moonshine_bundle / "decoder.onnx").stat(
    ).st_size


def test_fp16_halves_the_size(tiny_bundle: Path, tmp_path: Path) -> None:
    """fp16 weights, normalisation and softmax kept fp32, state I/O unchanged; on this CPU the
    provider computes in fp32, so the numbers are only a smoke test (the GPU issue checks)."""
    root = _variant(tiny_bundle, tmp_path / "fp16", {"encoder": "fp16", "decoder": "fp16"})
    fp32 = sum((tiny_bundle / f).stat().st_size for f in ("encoder.onnx", "decoder.onnx"))
    fp16 = sum((root / f).stat().st_size for f in ("encoder.onnx", "decoder.onnx"))
    assert fp16 <= 0.55 * fp32
    dec = onnx.load(str(root / "decoder.onnx")).graph
    ops = {n.op_type for n in dec.node}
    kept = [n for n in dec.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert kept and "Cast" in ops
    # the greedy head's log-probability is computed in fp32 too
    made_by = {out: n for n in dec.node for out in n.output}

    def fp32_cast(name: str) -> bool:
        n = made_by.get(name)
        return n is not None and n.op_type == "Cast" and any(
            a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)

    heads = [n for n in dec.node if n.op_type == "LogSoftmax"]
    assert heads and all(fp32_cast(n.input[0]) for n in heads)
    engine = WhisperEngine(Bundle.open(root, CPU))
    engine.encode(np.random.default_rng(4).standard_normal(32000).astype(np.float32) * 0.1)
    assert np.isfinite(engine.step(50257, 0)).all()


def test_bad_precisions_are_refused_before_export(tiny_whisper_dir: Path,
                                                  tmp_path: Path) -> None:
    graphs = ["encoder", "decoder"]
    assert precision_plan("encoder=int8,decoder=int4", graphs) == {"encoder": "int8",
                                                                   "decoder": "int4"}
    assert precision_plan("int4", graphs) == {"encoder": "int4", "decoder": "int4"}
    assert precision_plan("int8-encoder", graphs) == {"encoder": "int8"}
    with pytest.raises(ExportError, match=r"unknown precision 'int3'.*int8.*int4"):
        precision_plan("int3", graphs)
    with pytest.raises(ExportError, match=r"no graph 'joiner'.*encoder, decoder"):
        precision_plan("joiner=int8", graphs)
    with pytest.raises(ExportError, match=r"fp16 is not a precision the cpu target.*--target gpu"):
        precision_plan("decoder=fp16", graphs, "cpu")
    assert precision_plan("fp16", graphs, "gpu") == {"encoder": "fp16", "decoder": "fp16"}
    out = tmp_path / "b"
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "refs.tsv").write_text("broken.wav\tsome words\n")
    (unreadable / "broken.wav").write_bytes(b"RIFF\0\0\0\0WAVEjunk")
    for opts, match in (({"quantize": "int3"}, "unknown precision"),
                        ({"quantize": "fp16"}, "fp16 is not a precision the cpu target"),
                        ({"quantize": "int4", "block_size": 24}, "--block-size 24"),
                        ({"quantize": "int8", "eval_audio": tmp_path}, "refs.tsv"),
                        ({"quantize": "int8", "eval_audio": unreadable},
                         r"broken\.wav: evaluation audio is unreadable")):
        with pytest.raises(ExportError, match=match):
            export_bundle(ExportOptions(str(tiny_whisper_dir), out, **opts))
        assert not out.exists() and not list(tmp_path.glob(".b.*"))
    with pytest.raises(QuantizeError, match="not supported"):
        quantize_graphs(tmp_path, {"graphs": [{"name": "g", "file": "g.onnx"}]}, {"g": "int2"})


def test_int8_qdq_calibrated_on_speech_runs_on_cpu(tiny_bundle: Path, tmp_path: Path) -> None:
    """int8-qdq: static QDQ graphs (TensorRT's int8) whose activation scales come from the fp32
    bundle transcribing the project's real clips. Every MatMul weight is int8 behind a
    DequantizeLinear, activations pass QuantizeLinear with a fixed symmetric scale, the tied
    embedding reads the int8 projection, the CPU provider runs the bundle, and fixed scales keep
    a K-token block and single steps in agreement."""
    from conftest import speech_dir

    from edgestream.runtime import load

    root = _variant(tiny_bundle, tmp_path / "qdq", {"encoder": "int8-qdq", "decoder": "int8-qdq"})
    data = json.loads((root / "manifest.json").read_text())
    assert {g["name"]: g["precision"] for g in data["graphs"] if g["name"] != "vad"} == {
        "encoder": "int8-qdq", "decoder": "int8-qdq"}
    assert "beckett.wav" in data["calibration"]["clips"]
    for name in ("encoder.onnx", "decoder.onnx"):
        model = onnx.load(str(root / name))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
        inits = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "QuantizeLinear":  # activations: calibrated, symmetric int8
                assert inits[n.input[2]].data_type == TensorProto.INT8
                assert not numpy_helper.to_array(inits[n.input[2]]).any()
                assert 0 < float(numpy_helper.to_array(inits[n.input[1]])) < 1e3
        # no fp32 MatMul weight and no fp32 vocabulary table is left
        big = [tuple(i.dims) for i in model.graph.initializer
               if i.data_type == TensorProto.FLOAT and int(np.prod(i.dims)) >= 51864 * 64]
        assert big == [], (name, big)
    model = load(root, provider="cpu")
    assert model.transcribe(np.zeros(16000, np.float32), 16000) is not None
    from edgestream.runtime.audio.wav import read_wav, to_mono

    engine = WhisperEngine(Bundle.open(root, CPU))
    engine.encode(to_mono(read_wav(speech_dir() / "arctic_a0009.wav").samples))
    seq = [50257, 50362, 440, 1332, 995, 13, 3290, 262, 2068, 11, 290, 13]
    # Fixed scales quantize each row alike, but the fp32 sums before a QuantizeLinear round
    # differently for 1 and 12 rows (about 1e-6), and a value on a rounding boundary moves one
    # quantum: block and steps choose the same tokens, their logits lie within a few quanta
    # (not 1e-4: int8-qdq is TensorRT's precision, exact re-scoring is int4 / int8-nbits').
    k = engine.block_size
    block = engine.block(seq + [0] * (k - len(seq)), 0)[: len(seq)]
    steps = np.stack([engine.step(t, i) for i, t in enumerate(seq)])
    assert (block.argmax(axis=1) == steps.argmax(axis=1)).all()
    assert float(np.abs(block - steps).max()) <= 5e-2


def test_int8_qdq_needs_calibration_clips(tiny_bundle: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    with pytest.raises(ExportError, match=r"refs\.tsv: int8-qdq calibrates on the clips"):
        quantize_graphs(root, json.loads((root / "manifest.json").read_text()),
                        {"decoder": "int8-qdq"}, calibration_audio=tmp_path / "nothing")


def _published_width_stack(path: Path, width: int = 320, layers: int = 6, vocab: int = 4096
                           ) -> None:
    """A decoder-shaped stack at moonshine_streaming tiny's published width (320, MLP 1280):
    per layer a mixing matmul with an activation operand (attention's role: fp32, not a weight,
    computed by different kernels for 1 and 16 rows), layer norms, GELU MLP, residuals; then a
    vocabulary projection. Random weights, token axis symbolic."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name))
        return name

    ones = w("ln_w", width)
    inits[-1] = numpy_helper.from_array(np.ones(width, np.float32), "ln_w")
    x = "x"
    for i in range(layers):
        def ln(src: str, tag: str) -> str:
            out = f"l{i}_{tag}"
            nodes.append(helper.make_node("LayerNormalization", [src, ones], [out], axis=-1))
            return out

        mixed = f"l{i}_mixed"
        nodes.append(helper.make_node("MatMul", [ln(x, "ln1"), "mix"], [mixed]))
        nodes.append(helper.make_node("Add", [x, mixed], [f"l{i}_r1"]))
        up = f"l{i}_up"
        nodes.append(helper.make_node("MatMul", [ln(f"l{i}_r1", "ln2"), w(f"w1_{i}", width,
                                                                         4 * width)], [up]))
        nodes.append(helper.make_node("Gelu", [up], [f"l{i}_act"], domain="com.microsoft"))
        nodes.append(helper.make_node("MatMul", [f"l{i}_act", w(f"w2_{i}", 4 * width, width)],
                                      [f"l{i}_down"]))
        nodes.append(helper.make_node("Add", [f"l{i}_r1", f"l{i}_down"], [f"l{i}_out"]))
        x = f"l{i}_out"
    nodes.append(helper.make_node("MatMul", [x, w("proj", width, vocab)], ["logits"]))
    graph = helper.make_graph(
        nodes, "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "tokens", width]),
         helper.make_tensor_value_info("mix", TensorProto.FLOAT, [width, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "tokens", vocab])],
        inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                      helper.make_opsetid("com.microsoft", 1)]),
              str(path))


@pytest.mark.parametrize("precision", ["int4", "int8-nbits"])
def test_block_and_step_agree_at_published_width(precision: str, tmp_path: Path) -> None:
    """Per-row int8 activations (MatMulNBits accuracy level 4) are not enough at published width
    on every CPU: the fp32 operators in between round differently for 1 and 16 rows, an
    activation on an int8 rounding boundary moves a whole step, and depth amplifies it (measured
    on moonshine_streaming tiny: 1.7e-2). A graph run at several token counts keeps fp32
    activations (int8-nbits: as two 4-bit halves), and its 16-row block and 16 single rows then
    agree within 1e-4."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 320)).astype(np.float32)
    mix = (rng.standard_normal((320, 320)) / np.sqrt(320)).astype(np.float32)
    diffs = {}
    for exact in (False, True):
        path = tmp_path / f"{exact}.onnx"
        _published_width_stack(path)
        quantize_file(path, precision, block_size=32, exact_rows=exact)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        assert "MatMulNBits" in {n.op_type for n in onnx.load(str(path)).graph.node}
        block = s.run(None, {"x": x, "mix": mix})[0][0]
        steps = np.concatenate([s.run(None, {"x": x[:, i: i + 1], "mix": mix})[0][0]
                                for i in range(16)])
        diffs[exact] = float(np.abs(block - steps).max())
    assert diffs[True] <= 1e-4, diffs
    # Whether per-row int8 activations reproduce the problem depends on the CPU's kernels: an
    # earlier machine measured more than 1e-3 here; a Xeon with AVX-512 VNNI and AMX 1.3e-5
    # (its one-row and 16-row int8 paths round alike). The fp32-activation graphs must agree
    # within 1e-4 on every CPU, which is what the runtime relies on.
    print(f"block vs steps, int8 activations {diffs[False]:.2g}, fp32 activations "
          f"{diffs[True]:.2g}")
