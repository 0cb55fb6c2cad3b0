"""StateStore with state pairs shared by several graphs: a K-token decoder block beside the
one-token step writes K rows at a position into the step's own buffers, and reads (never writes)
the cross K/V that another graph fills."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest

from edgestream.runtime.errors import BundleError
from edgestream.runtime.manifest import parse_manifest
from edgestream.runtime.state import StateStore

T_MAX, K, HEADS, DIM, FRAMES = 10, 4, 2, 3, 5


def _tensor(name: str, shape: list[int], dtype: str = "float32") -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def _graph(name: str, inputs: list[dict], outputs: list[dict]) -> dict[str, Any]:
    return {"name": name, "file": f"{name}.onnx", "sha256": "0" * 64, "inputs": inputs,
            "outputs": outputs}


def _data() -> dict[str, Any]:
    kv, cross = [1, HEADS, T_MAX, DIM], [1, HEADS, FRAMES, DIM]

    def decoder(name: str, k: int) -> dict[str, Any]:
        return _graph(name, [_tensor("tokens", [1, k], "int64"), _tensor("position", [1], "int64"),
                             _tensor("self_k", kv), _tensor("cross_k", cross)],
                      [_tensor("logits", [1, k, 7]), _tensor("new_self_k", [1, HEADS, k, DIM])])

    return {
        "schema_version": 1, "family": "test", "pipeline": "whisper_window",
        "source": {"id": "test"}, "audio": {"sample_rate": 16000, "chunk_samples": 160},
        "graphs": [_graph("encoder", [_tensor("mel", [1, 4])], [_tensor("cross_k", cross)]),
                   decoder("decoder", 1), decoder("decoder_block", K)],
        "states": [
            {"name": "cross_k", "graph": "decoder", "input": "cross_k", "output_graph": "encoder",
             "output": "cross_k", "shape": cross, "dtype": "float32", "update": "replace",
             "shared_with": ["decoder_block"]},
            {"name": "self_k", "graph": "decoder", "input": "self_k", "output": "new_self_k",
             "shape": kv, "dtype": "float32", "update": "append", "axis": 2, "init": -1.0,
             "shared_with": ["decoder_block"]}],
        "tokenizer": {"file": "tokenizer.json"}, "decoding": {"max_tokens": T_MAX}}


def _rows(k: int, start: float) -> np.ndarray:
    return (start + np.arange(k, dtype=np.float32)).reshape(1, 1, k, 1) * np.ones(
        (1, HEADS, k, DIM), np.float32)


def test_shared_pairs_parse_with_derived_read_only() -> None:
    m = parse_manifest(_data())
    states = {s.name: s for s in m.states}
    cross, own = states["cross_k"], states["self_k"]
    assert cross.shared_with == own.shared_with == ("decoder_block",)
    assert cross.read_only == ("decoder_block",) and own.read_only == ()
    assert cross.reads("decoder_block") and not cross.writes("decoder_block")
    assert cross.writes("encoder") and not cross.reads("encoder")
    assert own.reads("decoder_block") and own.writes("decoder_block")
    assert parse_manifest(json.loads(m.to_json())) == m  # read_only round-trips


def test_block_appends_k_rows_at_its_position_and_only_reads_cross() -> None:
    store = StateStore(parse_manifest(_data()))
    assert set(store.feeds("decoder_block")) == set(store.feeds("decoder")) == {"self_k",
                                                                                 "cross_k"}
    enc = np.full((1, HEADS, FRAMES, DIM), 5.0, np.float32)
    store.update("encoder", {"cross_k": enc})
    # the block's outputs carry no cross_k: update must not look for it nor touch the buffer
    store.update("decoder_block", {"logits": np.zeros((1, K, 7), np.float32),
                                   "new_self_k": _rows(K, 10.0)}, position=2)
    buf = store.buffers["self_k"]
    assert (buf[:, :, :2] == -1.0).all() and (buf[:, :, 6:] == -1.0).all()
    np.testing.assert_array_equal(buf[:, :, 2:6], _rows(K, 10.0))
    # a one-token step after the block writes its row right behind it
    store.update("decoder", {"logits": np.zeros((1, 1, 7), np.float32),
                             "new_self_k": _rows(1, 99.0)}, position=6)
    np.testing.assert_array_equal(buf[:, :, 2:7], np.concatenate([_rows(K, 10.0),
                                                                   _rows(1, 99.0)], axis=2))
    assert store.buffers["cross_k"] is enc
    # re-scoring from an earlier position overwrites the rows there, and nothing else
    store.update("decoder_block", {"new_self_k": _rows(K, 20.0)}, position=1)
    np.testing.assert_array_equal(buf[:, :, 1:5], _rows(K, 20.0))
    np.testing.assert_array_equal(buf[:, :, 5:7], np.concatenate([_rows(1, 13.0),
                                                                  _rows(1, 99.0)], axis=2))


def test_block_overhanging_the_buffer_end_keeps_the_rows_that_fit() -> None:
    store = StateStore(parse_manifest(_data()))
    store.update("decoder_block", {"new_self_k": _rows(K, 30.0)}, position=T_MAX - 1)
    buf = store.buffers["self_k"]
    np.testing.assert_array_equal(buf[:, :, T_MAX - 1:], _rows(1, 30.0))
    assert (buf[:, :, :T_MAX - 1] == -1.0).all()
    store.update("decoder_block", {"new_self_k": _rows(K, 40.0)}, position=T_MAX)  # no row fits
    np.testing.assert_array_equal(buf[:, :, T_MAX - 1:], _rows(1, 30.0))


def test_reset_of_the_block_resets_what_it_reads() -> None:
    store = StateStore(parse_manifest(_data()))
    store.update("encoder", {"cross_k": np.ones((1, HEADS, FRAMES, DIM), np.float32)})
    store.update("decoder_block", {"new_self_k": _rows(K, 1.0)}, position=0)
    store.reset({"decoder_block"})
    assert (store.buffers["self_k"] == -1.0).all() and (store.buffers["cross_k"] == 0.0).all()


def _refused(change) -> str:
    data = copy.deepcopy(_data())
    change(data)
    with pytest.raises(BundleError) as err:
        parse_manifest(data)
    return str(err.value)


def test_read_only_that_disagrees_with_the_graphs_is_refused() -> None:
    msg = _refused(lambda d: d["states"][1].__setitem__("read_only", ["decoder_block"]))
    assert "states[1].read_only (self_k)" in msg and "'new_self_k'" in msg
    msg = _refused(lambda d: d["states"][0].__setitem__("read_only", []))
    assert "states[0].read_only (cross_k)" in msg and "['decoder_block']" in msg


def test_shared_graph_errors_are_named() -> None:
    msg = _refused(lambda d: d["states"][1].__setitem__("shared_with", ["block"]))
    assert "states[1] (self_k) refers to unknown graph 'block'" in msg

    def no_input(d: dict[str, Any]) -> None:
        d["graphs"][2]["inputs"][2]["name"] = "self_key"
    assert "graph 'decoder_block' has no input named 'self_k'" in _refused(no_input)

    def bad_slice(d: dict[str, Any]) -> None:  # K rows, but of another head count
        d["graphs"][2]["outputs"][1]["shape"] = [1, HEADS + 1, K, DIM]
    msg = _refused(bad_slice)
    assert "(self_k) append slice" in msg and f"[1, {HEADS + 1}, {K}, {DIM}]" in msg
