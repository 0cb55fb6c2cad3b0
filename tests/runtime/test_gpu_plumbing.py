"""GPU plumbing that runs without a GPU: provider options taken from the device profile, the VAD
kept on the CPU, and the CUDA-graph capture decision read from onnxruntime's real partitioning
of a bundle graph."""

from __future__ import annotations

from pathlib import Path

from edgestream.runtime import load
from edgestream.runtime.cuda_graphs import CUDA_EP, CaptureSlots, capture_blockers, decide
from edgestream.runtime.profiles import load_profile
from edgestream.runtime.session import provider_options, session_config


def test_profile_provider_options_reach_the_session_config() -> None:
    cfg = session_config("auto", 0, "nvidia-desktop")
    # this machine has no CUDA: the first provider the onnxruntime offers is used
    assert cfg.provider == "cpu"
    assert cfg.provider_options["cuda"]["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cfg.captured_streams == load_profile("nvidia-desktop").memory.cuda_graph_streams == 4
    opts = provider_options("cuda", cfg.provider_options["cuda"])
    assert opts["gpu_mem_limit"] == str(8192 * 2**20) and opts["device_id"] == "0"
    assert provider_options("tensorrt", {"fp16": True}) == {"trt_fp16_enable": "true"}
    # an explicit choice wins over the profile
    assert session_config("cpu", 3, "jetson-orin-nano").threads == 3
    assert session_config("cpu", 0, "jetson-orin-nano").threads == 4


def test_vad_graph_stays_on_the_cpu(tiny_moonshine_bundle: Path) -> None:
    model = load(tiny_moonshine_bundle, profile="cpu-x86_64", execution="bound")
    vad = model.bundle.manifest.vad
    assert vad and model.bundle.sessions[vad].config.provider == "cpu"
    assert model.bundle.sessions[vad].config.execution == "host"
    assert model.bundle.sessions["decoder"].config.execution == "bound"
    stream = model.stream()  # VAD state on the host, the model's state bound
    assert stream.states.execution == "bound" and stream.states.feeds(vad)


def test_capture_decision_from_a_real_partition(tiny_bundle: Path) -> None:
    model = load(tiny_bundle, provider="cpu")
    session = model.bundle.sessions["decoder"]
    nodes = session.node_providers()
    assert len(nodes) > 20 and {p for p, _, _ in nodes} == {"CPUExecutionProvider"}
    # on the CPU provider nothing is captured, and the reason says so
    d = decide("decoder", session.provider, "bound", 4, nodes)
    assert not d.capture and "not CUDA" in d.reason
    assert not session.capture.capture and session.slots.claim() is False
    # the same partition seen as a CUDA session: every CPU-placed node is named, shape ops too
    d = decide("decoder", CUDA_EP, "bound", 4, nodes)
    assert not d.capture and len(d.blockers) == len(nodes)
    shape_ops = [b for b in d.blockers if b.op_type == "Shape"]
    assert shape_ops and "int64 shape arithmetic" in shape_ops[0].why
    assert shape_ops[0].node in d.log_line() or d.blockers[0].node in d.log_line()
    # all nodes on CUDA and no copies: capturable, for the profile's streams only
    on_cuda = [(CUDA_EP, name, op) for _, name, op in nodes]
    assert decide("decoder", CUDA_EP, "bound", 2, on_cuda).capture
    assert not decide("decoder", CUDA_EP, "host", 2, on_cuda).capture
    assert not decide("decoder", CUDA_EP, "bound", 0, on_cuda).capture
    copy = on_cuda + [(CUDA_EP, "Memcpy_token", "MemcpyFromHost")]
    blockers = capture_blockers(copy)
    assert [b.node for b in blockers] == ["Memcpy_token"]
    slots = CaptureSlots(2)
    assert [slots.claim() for _ in range(3)] == [True, True, False]
    assert len({slots.next_id() for _ in range(5)}) == 5


def test_warmup_says_tensorrt_is_missing_and_runs_every_graph(
        tiny_bundle: Path, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from edgestream.runtime.cli import main

    assert main(["warmup", str(tiny_bundle), "--profile", "jetson-orin-nano",
                 "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TensorRT is not available" in out and "warming up on cpu" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("encoder", "decoder"))]
    # the decoder at both declared sizes (1 and K), the encoder once, all on the CPU
    assert sorted((r[0], r[1]) for r in rows) == [("decoder", "1"), ("decoder", "16"),
                                                  ("encoder", "1")]
    assert all(r[2] == "CPUExecutionProvider" for r in rows)
