"""Device profiles and `edgestream doctor`: every shipped profile parses, detection picks the
right one from what a device reports, doctor proves a provider with a real inference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgestream.runtime import profiles
from edgestream.runtime.profiles import DeviceFacts, ProfileError

EXPECTED = {"jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-thor",
            "nvidia-desktop", "cpu-x86_64", "cpu-aarch64"}


def test_every_profile_the_issue_names_ships_and_parses() -> None:
    assert set(profiles.names()) == EXPECTED
    for name in EXPECTED:
        p = profiles.load_profile(name)
        assert p.providers and p.providers[-1] == "cpu"  # the CPU is always the last resort
        assert p.memory.budget_mb > 0 and p.audio.rate == 16000
        if name.startswith("jetson"):
            assert p.providers[0] == "tensorrt" and p.memory.cuda_graph_streams >= 1


@pytest.mark.parametrize("facts, name", [
    # /proc/device-tree/model strings as JetPack reports them
    (DeviceFacts("aarch64", "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"),
     "jetson-orin-nano"),
    (DeviceFacts("aarch64", "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"),
     "jetson-orin-nx"),
    (DeviceFacts("aarch64", "Jetson AGX Orin Developer Kit"), "jetson-agx-orin"),
    (DeviceFacts("aarch64", "NVIDIA Jetson AGX Thor Developer Kit"), "jetson-thor"),
    (DeviceFacts("aarch64", "Raspberry Pi 5 Model B Rev 1.0"), "cpu-aarch64"),
    (DeviceFacts("x86_64", "", ("NVIDIA GeForce RTX 4070",)), "nvidia-desktop"),
    (DeviceFacts("x86_64", "", ("NVIDIA H200",)), "nvidia-desktop"),
    (DeviceFacts("x86_64"), "cpu-x86_64"),
])
def test_detection(facts: DeviceFacts, name: str) -> None:
    assert profiles.detect(facts).name == name


def test_bad_profiles_are_named(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="'jetson-nano' is unknown; builtin profiles are"):
        profiles.load_profile("jetson-nano")
    bad = tmp_path / "mine.toml"
    bad.write_text('[session]\nproviders = ["rocm"]\n')
    with pytest.raises(ProfileError, match=r"mine.toml: session.providers must list"):
        profiles.load_profile(str(bad))
    bad.write_text('[precision]\nencoder = "int3"\n')
    with pytest.raises(ProfileError, match=r"precision.encoder = 'int3'"):
        profiles.load_profile(str(bad))
    bad.write_text('[memory]\nbudget = 3\n')
    with pytest.raises(ProfileError, match=r"\[memory\]: unknown key 'budget'"):
        profiles.load_profile(str(bad))
    bad.write_text('[memory]\nsnapshot_mb = -1\n')
    with pytest.raises(ProfileError, match=r"mine.toml: memory.snapshot_mb must be >= 0"):
        profiles.load_profile(str(bad))


def test_profile_sets_the_responders_snapshot_budget(tmp_path: Path) -> None:
    """`run --respond --profile P` gives the LM the profile's recurrent-snapshot budget;
    without a profile the engine's default applies."""
    import argparse

    from edgestream.runtime.commands import responder_options

    args = argparse.Namespace(system_prompt=None, max_reply_tokens=64, pause_ms=200,
                              no_speculative=False, profile="jetson-orin-nano")
    assert responder_options(args).snapshot_bytes == 128 * 2**20
    mine = tmp_path / "mine.toml"
    mine.write_text('[memory]\nsnapshot_mb = 0\n')
    assert responder_options(argparse.Namespace(**{**vars(args), "profile": str(mine)})
                             ).snapshot_bytes == 0
    assert responder_options(argparse.Namespace(**{**vars(args), "profile": None})
                             ).snapshot_bytes is None


def test_doctor_graph_shipped_is_the_one_the_exporter_builds() -> None:
    from edgestream.export.doctor_graph import OUT, build

    assert OUT.read_bytes() == build()


def test_doctor_reference_agrees_with_onnxruntime_cpu() -> None:
    """The numpy reference of the doctor graph against onnxruntime on the CPU: two independent
    implementations of Conv/Relu/MatMul/Softmax."""
    from edgestream.runtime.doctor import check_provider, doctor_input, expected_output

    check = check_provider("cpu", {})
    assert check.ok, check.detail
    y = expected_output(doctor_input())
    assert y.shape == (1, 16, 10) and np.allclose(y.sum(-1), 1.0, atol=1e-6)


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgestream.runtime.cli", "doctor", *args],
                          capture_output=True, text=True, timeout=300)


def test_doctor_on_this_cpu_with_a_bundle(tiny_bundle: Path) -> None:
    result = run_doctor(str(tiny_bundle), "--profile", "cpu-x86_64")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "profile: cpu-x86_64 (chosen)" in out and "onnxruntime " in out
    for graph in ("built-in graph", "encoder", "decoder", "vad"):
        assert f"[ok] cpu: {graph}" in out, out
    assert "works here" in out


def test_doctor_fails_when_the_profiles_first_provider_is_missing() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the failure path needs one without it")
    result = run_doctor("--profile", "nvidia-desktop")
    assert result.returncode == 4, result.stdout
    assert "[FAIL] cuda: listed: CUDAExecutionProvider is not in this onnxruntime" in \
        result.stdout and "does NOT work here" in result.stdout
    assert "[ok] cpu: built-in graph" in result.stdout  # the fallback is still checked
