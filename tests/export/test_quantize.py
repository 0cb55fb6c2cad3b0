"""Dynamic int8 of bundle graphs: the tied-projection transpose fold, signatures and hashes kept,
accuracy on the tiny random model, WER and speed on real Whisper tiny.en."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgestream.export.quantize import QuantizeError, fold_weight_transposes, quantize_graphs
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.session import SessionConfig

from conftest import HUMAN_CLIPS, references, speech_dir

BIG = 1_000_000  # elements: no fp32 MatMul weight this large may survive quantization


def _quantized_copy(src: Path, dst: Path) -> tuple[Path, list[str]]:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    names = {g["name"] for g in manifest["graphs"]}
    graphs = tuple(g for g in ("encoder", "decoder") if g in names)
    out = quantize_graphs(dst, manifest, graphs, per_channel=False)  # one scale per tensor
    (dst / "manifest.json").write_text(json.dumps(out, indent=2))
    return dst, [g["file"] for g in out["graphs"] if g["name"] in graphs]


def _fp32_matmul_weights(path: Path) -> list[int]:
    """Sizes of the float32 initializers read as a MatMul/Gemm weight, directly or through a
    Transpose/Identity (written apart from the module's own helper on purpose)."""
    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    sizes = []
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm"):
            src = n.input[1]
            while src in producer and producer[src].op_type in ("Transpose", "Identity"):
                src = producer[src].input[0]
            if src in inits and inits[src].data_type == TensorProto.FLOAT:
                sizes.append(int(np.prod(inits[src].dims)))
    return sizes


def _io(path: Path) -> list[bytes]:
    g = onnx.load(str(path)).graph
    return [v.SerializeToString() for v in (*g.input, *g.output)]


def _rel_rms(a: dict, b: dict) -> float:
    num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in b)
    return (num / sum(float(np.sum(b[k] ** 2)) for k in b)) ** 0.5


def test_fold_keeps_gather_on_original_and_gets_quantized(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((300, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "tok"], ["x"]),
         helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "emb_t"], ["logits"])], "tied",
        [helper.make_tensor_value_info("tok", TensorProto.INT64, [1, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, 300])],
        [numpy_helper.from_array(emb, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert fold_weight_transposes(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Gather", "MatMul"]  # the transpose is gone, the Gather still reads `emb`
    assert model.graph.node[0].input[0] == "emb"
    folded = numpy_helper.to_array(next(i for i in model.graph.initializer
                                        if i.name == model.graph.node[1].input[1]))
    np.testing.assert_array_equal(folded, emb.T)
    onnx.checker.check_model(model)

    folder = tmp_path / "b"
    folder.mkdir()
    onnx.save(model, str(folder / "g.onnx"))
    from edgestream.runtime.bundle import sha256_file

    manifest = {"graphs": [{"name": "g", "file": "g.onnx", "precision": "fp32",
                            "sha256": sha256_file(folder / "g.onnx")}]}
    out = quantize_graphs(folder, manifest, ("g",))
    assert manifest["graphs"][0]["precision"] == "fp32"  # the caller's dict is not changed
    assert out["graphs"][0]["precision"] == "int8"
    assert out["graphs"][0]["sha256"] == sha256_file(folder / "g.onnx")
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(folder / "g.onnx")).graph.node}
    with pytest.raises(QuantizeError, match="no graph named nope"):
        quantize_graphs(folder, out, ("nope",))
    with pytest.raises(QuantizeError, match="not supported"):
        quantize_graphs(folder, out, {"g": "int2"})


def test_tampered_graph_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    with (folder / "encoder.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(QuantizeError, match="sha256"):
        quantize_graphs(folder, manifest, ("encoder",))


def test_tiny_bundle_int8(tiny_bundle: Path, tmp_path: Path) -> None:
    folder, files = _quantized_copy(tiny_bundle, tmp_path / "int8")
    bundle = Bundle.open(folder)  # hashes, names, shapes and dtypes all check out
    precision = {g.name: g.precision for g in bundle.manifest.graphs}
    assert precision["encoder"] == precision["decoder"] == "int8"
    assert precision["vad"] == "fp32"
    d_model, vocab = 64, 51864
    for name in files:  # encoder, decoder and the K-token decoder block where there is one
        assert _io(folder / name) == _io(tiny_bundle / name)
        assert all(s < BIG for s in _fp32_matmul_weights(folder / name)), name
    assert any(s >= BIG for s in _fp32_matmul_weights(tiny_bundle / "decoder.onnx"))
    assert (folder / "encoder.onnx").stat().st_size < (tiny_bundle / "encoder.onnx").stat().st_size
    # the vocabulary matrix dominates this tiny model and is stored once, as int8: the decoder
    # shrinks to about a quarter
    assert ((folder / "decoder.onnx").stat().st_size
            < 0.35 * (tiny_bundle / "decoder.onnx").stat().st_size)
    enc = onnx.load(str(folder / "encoder.onnx")).graph
    assert [n.op_type for n in enc.node].count("Conv") == 2  # the conv front end stays fp32
    dec = onnx.load(str(folder / "decoder.onnx")).graph
    fp32 = {i.name: tuple(i.dims) for i in dec.initializer if i.data_type == TensorProto.FLOAT}
    # the token embedding Gather reads the projection's int8 weights: no fp32 table is left
    assert (vocab, d_model) not in fp32.values() and (d_model, vocab) not in fp32.values()

    ref = Bundle.open(tiny_bundle)
    mel = np.random.default_rng(1).standard_normal((1, 80, 3000)).astype(np.float32)
    cross = ref.sessions["encoder"].run({"mel": mel})
    enc_err = _rel_rms(bundle.sessions["encoder"].run({"mel": mel}), cross)
    feeds = {t.name: np.zeros([1 if isinstance(d, str) else d for d in t.shape], t.dtype)
             for t in ref.manifest.graph("decoder").inputs}
    feeds.update({k: v for k, v in cross.items() if k in feeds})
    feeds["tokens"] = np.array([[50257]], dtype=np.int64)
    feeds["position"] = np.array([0], dtype=np.int64)
    want = ref.sessions["decoder"].run(feeds)["logits"]
    got = bundle.sessions["decoder"].run(feeds)["logits"]
    dec_err = _rel_rms({"l": got}, {"l": want})
    print(f"tiny random int8: encoder rel RMS {enc_err:.4f}, decoder logits rel RMS {dec_err:.4f}")
    assert enc_err < 0.1 and dec_err < 0.1


@pytest.mark.slow
def test_real_tiny_en_int8(real_bundle: Path, tmp_path: Path) -> None:
    """Real weights: WER on the human clips stays within 3 %, int8 is faster, encoder error."""
    from edgestream.export.wer import word_error_rate
    from edgestream.runtime.families.whisper.transcribe import transcribe_audio
    from edgestream.runtime.audio.wav import read_wav, to_mono
    from edgestream.runtime.families.whisper.engine import WhisperEngine

    folder, files = _quantized_copy(real_bundle, tmp_path / "int8")
    for name in files:
        assert all(s < BIG for s in _fp32_matmul_weights(folder / name)), name
    sizes = {n: ((real_bundle / n).stat().st_size, (folder / n).stat().st_size)
             for n in ("encoder.onnx", "decoder.onnx")}
    for name, (before, after) in sizes.items():
        assert after < before, name

    refs = references()
    audio = [to_mono(read_wav(speech_dir() / c).samples) for c in HUMAN_CLIPS]
    cfg = SessionConfig("cpu", 2)
    engines = {"fp32": WhisperEngine(Bundle.open(real_bundle, cfg)),
               "int8": WhisperEngine(Bundle.open(folder, cfg))}
    times: dict[str, list[float]] = {k: [] for k in engines}
    wer = {}
    for rep in range(3):
        for name, engine in engines.items():
            t = time.perf_counter()
            hyps = [transcribe_audio(engine, a).text for a in audio]
            times[name].append(time.perf_counter() - t)
            wer[name] = word_error_rate([refs[c] for c in HUMAN_CLIPS], hyps)

    errs = []
    fp32, int8 = engines["fp32"], engines["int8"]
    for a in audio:
        mel = fp32.mel(a[: fp32.bundle.manifest.audio.window_samples])[None]
        errs.append(_rel_rms(int8.encoder.run({"mel": mel}), fp32.encoder.run({"mel": mel})))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"sizes MB {({k: (round(a / 1e6, 1), round(b / 1e6, 1)) for k, (a, b) in sizes.items()})}"
          f"; WER {wer}; transcribe median of 3, 2 threads: fp32 {med['fp32']:.2f} s, int8 "
          f"{med['int8']:.2f} s ({med['int8'] / med['fp32']:.2f}x); encoder rel RMS "
          f"{max(errs):.3f} worst clip")
    assert wer["int8"] <= 0.03
    assert med["int8"] < med["fp32"]
    assert max(errs) < 0.15
