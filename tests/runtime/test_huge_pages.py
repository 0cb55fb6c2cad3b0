"""Huge pages for session weights: the kernel's own accounting (/proc/self/smaps_rollup) must show
the collapsed bytes, resident memory must not grow, and partly used ranges stay as they are."""

from __future__ import annotations

import json
import mmap
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgestream.runtime import huge_pages

MiB = 1 << 20


def _rollup() -> dict[str, int]:
    """Rss and AnonHugePages of this process in bytes, as the kernel counts them."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "AnonHugePages"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _needs_collapse() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("huge pages are a Linux feature")
    release = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    if release < (6, 1):
        pytest.skip(f"kernel {platform.release()} has no MADV_COLLAPSE (Linux 6.1+)")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine ([never])")


def _private(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def test_only_wholly_resident_ranges_are_collapsed() -> None:
    _needs_collapse()
    page = mmap.PAGESIZE
    before = huge_pages.anonymous_regions()
    full, sparse = _private(8 * MiB), _private(8 * MiB)
    for at in range(0, 8 * MiB, page):
        full[at] = 1
    for at in range(0, 8 * MiB, 2 * page):  # every other page: half resident
        sparse[at] = 1
    rss = _rollup()
    done = huge_pages.collapse_new(before)
    after = _rollup()
    # an 8 MiB mapping holds at least three aligned 2 MiB ranges; the sparse one gives none
    # (no upper bound: a new mapping the kernel merged with an older neighbour counts as new,
    # and that neighbour's wholly resident ranges may be collapsed too, at no memory cost)
    assert done >= 6 * MiB, done
    assert after["AnonHugePages"] - rss["AnonHugePages"] >= 6 * MiB
    # the same pages, now large: resident memory did not grow (the sparse one was not filled)
    assert after["Rss"] - rss["Rss"] < 2 * MiB, (rss, after)
    assert bytes(full[:4]) == b"\x01\x00\x00\x00" and sparse[page] == 0
    full.close()
    sparse.close()


# A fresh process opens the session: in the test process, an earlier test's freed LM session
# leaves heap chunks (already on huge pages) that glibc may hand to this weight, and reused huge
# pages are not counted again.
SESSION_CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
from edgestream.runtime.manifest import GraphSpec, TensorSpec
from edgestream.runtime.session import GraphSession, SessionConfig
def rollup():
    line = next(l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages"))
    return int(line.split()[1]) * 1024
path = Path(sys.argv[1])
spec = GraphSpec("mm", path.name, "0" * 64, "fp32", (TensorSpec("x", "float32", (1, 1024)),),
                 (TensorSpec("y", "float32", (1, 4096)),))
huge = rollup()
session = GraphSession(path, spec, SessionConfig("cpu", 1))
x = np.load(sys.argv[2])
np.save(sys.argv[3], session.run({"x": x})["y"])
print(json.dumps({"reported": session.huge_page_bytes, "counted": rollup() - huge}))
"""


def test_a_session_puts_its_prepacked_weights_on_huge_pages(tmp_path: Path) -> None:
    """A graph with a 16 MB MatMul weight (onnxruntime prepacks it when the session is created):
    GraphSession reports the bytes, the kernel counts them, and the results are unchanged."""
    _needs_collapse()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 4096)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
        [numpy_helper.from_array(w, "w")])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([sys.executable, "-c", SESSION_CHILD, str(path), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["reported"] >= 12 * MiB, got
    assert got["counted"] >= 12 * MiB, got
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), x @ w, rtol=1e-4, atol=1e-3)


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESTREAM_HUGE_PAGES", "0")
    before = huge_pages.anonymous_regions()
    region = _private(4 * MiB)
    region.write(b"\x01" * (4 * MiB))
    assert before == set() and huge_pages.collapse_new(before) == 0
    region.close()

