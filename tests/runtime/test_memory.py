"""Resident-memory measures of the runtime: glibc's mmap threshold, the VAD session opened on
first use, the encoder's arena handed back after each run."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgestream.runtime import load
from edgestream.runtime.memory import return_large_blocks

# A fresh process: allocate and free a 24 MB block (glibc then raises its mmap threshold to 24
# MB), then touch and free 8 MB blocks; prints how much of them stayed resident.
CHILD = r"""
import sys, numpy as np
if sys.argv[1] == "fixed":
    from edgestream.runtime.memory import return_large_blocks
    assert return_large_blocks()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
big = np.ones(3_000_000); del big
before = rss()
keep = [np.zeros(10)]
for _ in range(4):
    a = np.ones(1_000_000); keep.append(np.zeros(10)); del a  # small objects pin the heap top
print(rss() - before)
"""


def _is_glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _is_glibc(), reason="glibc only")
def test_freed_large_blocks_go_back_to_the_os() -> None:
    kept = {}
    for mode in ("default", "fixed"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                             check=True, env={"PATH": "/usr/bin:/bin"}).stdout
        kept[mode] = float(out.split()[-1])
    assert kept["default"] > 6, kept  # the glibc behaviour this works around is real here
    assert kept["fixed"] < 2, kept
    assert return_large_blocks()  # idempotent in this process


# A fresh process: where a 1 MiB block lands (the heap or a mapping of its own) before, inside and
# after `packed_allocations`, and whether freed large blocks still go back to the OS after it.
PACKED = r"""
import ctypes
from edgestream.runtime.memory import packed_allocations, return_large_blocks
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
def heap():
    line = next(l for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]"))
    return [int(x, 16) for x in line.split()[0].split("-")]
def where():
    at = libc.malloc(1 << 20)
    ctypes.memset(at, 1, 1 << 20)  # in use, so the next block cannot take its place
    lo, hi = heap()
    return "heap" if lo <= at < hi else "own"
assert return_large_blocks()
out = [where()]
with packed_allocations():
    out += [where(), where()]
out.append(where())
print(" ".join(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _is_glibc(), reason="glibc only")
def test_packed_allocations_come_from_the_heap_only_while_a_session_loads() -> None:
    out = subprocess.run([sys.executable, "-c", PACKED], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["own", "heap", "heap", "own"], out


def test_vad_session_opens_on_first_use(tiny_bundle: Path) -> None:
    model = load(tiny_bundle, provider="cpu", threads=1)
    vad = model.bundle.manifest.vad
    assert vad and vad not in model.bundle.sessions
    audio = np.zeros(16000, np.float32)
    model.transcribe(audio, 16000)  # whole-file transcription never runs the VAD
    assert vad not in model.bundle.sessions
    stream = model.stream(vad="silero")
    stream.feed(audio, 16000)
    stream.finish()
    assert vad in model.bundle.sessions
    assert model.bundle.sessions[vad].provider == "CPUExecutionProvider"
    assert vad in stream.stats_event().values["graphs"]
    with pytest.raises(KeyError):
        model.bundle.sessions["no-such-graph"]


def test_whisper_encoder_arena_shrinks_and_decoder_keeps_its_own(tiny_bundle: Path) -> None:
    model = load(tiny_bundle, provider="cpu", threads=1)
    sessions = model.bundle.sessions
    assert sessions["encoder"]._run_options is not None
    assert sessions["decoder"]._run_options is None
    # the shrinking run still computes: the transcript of real speech is the same either way
    from edgestream.runtime.audio.wav import read_wav, to_mono
    from conftest import speech_dir

    audio = to_mono(read_wav(speech_dir() / "beckett.wav").samples).astype(np.float32)
    shrunk = model.transcribe(audio, 16000)
    sessions["encoder"]._run_options = None
    assert model.transcribe(audio, 16000) == shrunk
