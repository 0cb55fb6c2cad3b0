"""Weights on 2 MiB pages: fewer TLB misses for a decoder step that reads every weight once.

A one-token LM step (and a Whisper decoder step) streams the whole model through the CPU for a
few milliseconds of arithmetic, so its speed depends on address translation as much as on the
kernels: on 4 KiB pages SmolLM2-135M's weights span about 40,000 pages. Linux backs anonymous
memory with 2 MiB pages only where a process asks (transparent huge pages are "madvise" on most
distributions and on JetPack), and onnxruntime does not ask. After a session is created, its
prepacked weights sit in new anonymous mappings; `collapse_new` turns each 2 MiB-aligned range
of them that is wholly resident into one huge page (MADV_COLLAPSE, Linux 6.1+). Only wholly
resident ranges are touched, so resident memory does not grow (collapsing a partly used range
would fill its holes). Measured (tests/benchmarks/lm_decode.py, SmolLM2 int8, one thread,
token by token): 4 to 6 % more tokens per second in one process, and the load-order spread gone
(on 4 KiB pages a session created early in a process ran up to 27 % slower than the same one
created later).

Only new mappings and the heap are looked at.
onnxruntime prepacks each weight into a block of its own, mostly under 2 MiB for a small LM: as
separate mappings none could be collapsed, so an LM session has them allocated one after another
in the heap (`memory.packed_allocations`; SmolLM2-135M int8: 154 to 166 of 172 MiB on huge pages
instead of 82 to 100).

A no-op where the kernel or libc cannot do it (older kernels, THP "never", macOS), or with
EDGESTREAM_HUGE_PAGES=0."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

HUGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) PMD size
MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1
MAPS = "/proc/self/maps"
ROLLUP = "/proc/self/smaps_rollup"

Region = tuple[int, int]  # [start, end) of one mapping


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("EDGESTREAM_HUGE_PAGES") != "0"


def _huge_bytes() -> int:
    """AnonHugePages of this process, as the kernel counts them (0 where unreadable)."""
    try:
        with open(ROLLUP) as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def anonymous_regions() -> set[Region]:
    """Private writable mappings with no file behind them (the heap included), where malloc and
    onnxruntime's arena put what they allocate."""
    return {region for region, _ in _scan()}


def _scan() -> list[tuple[Region, bool]]:
    """Each anonymous private writable mapping, and whether it is the heap."""
    if not enabled():
        return []
    found = []
    try:
        with open(MAPS) as maps:
            for line in maps:
                fields = line.split()
                heap = len(fields) > 5 and fields[5] == "[heap]"
                anonymous = fields[4] == "0" and (len(fields) < 6 or heap)
                if anonymous and fields[1].startswith("rw") and fields[1][3] == "p":
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    found.append(((start, end), heap))
    except OSError:
        return []
    return found


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


def collapse_new(before: set[Region]) -> int:
    """Collapse the wholly resident 2 MiB ranges of the mappings that are not in `before` (taken
    with `anonymous_regions` before the allocation) and of the heap: blocks may have reused its
    freed space without changing its bounds (glibc serves even a large block from a free heap
    chunk, e.g. one an earlier LM session's packed weights left). Returns how many more bytes
    the kernel counts on huge pages (reused space already on huge pages is not counted again).
    Never raises: a kernel that refuses leaves the pages as they were."""
    if not enabled():
        return 0
    libc = _libc()
    if libc is None:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    resident = (ctypes.c_ubyte * (HUGE // page))()
    done = refused = 0
    counted = _huge_bytes()
    regions = {region for region, heap in _scan() if heap or region not in before}
    for start, end in sorted(regions):
        at = -(-start // HUGE) * HUGE
        while at + HUGE <= end:
            if libc.mincore(at, HUGE, resident) == 0 and all(b & 1 for b in resident):
                if libc.madvise(at, HUGE, MADV_COLLAPSE) == 0:
                    done += 1
                else:
                    refused += 1
                    if ctypes.get_errno() == 22:  # EINVAL: this kernel has no MADV_COLLAPSE
                        log.debug("huge pages: MADV_COLLAPSE not supported here")
                        return 0
            at += HUGE
    gained = max(0, _huge_bytes() - counted)
    if done or refused:
        log.debug("huge pages: %d MiB more (%d ranges collapsed, %d refused)", gained >> 20,
                  done, refused)
    return gained
