"""Process memory settings for a device with little RAM to spare.

glibc's malloc serves blocks from 128 KiB up with mmap and gives them back when freed, but after
the first such block is freed it raises that threshold to the block's size (up to 32 MiB): from
then on, large transients (a graph file read while a session loads, a window's encoder
activations) come from the heap, and freed heap memory mostly stays resident. Fixing the
threshold keeps large blocks going back to the OS, which lowers the peak resident memory of
loading a bundle and transcribing a file (about 7 MB for Whisper tiny.en int8) at no measured
speed cost (onnxruntime's arena reuses its own blocks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value; fixing it turns its dynamic raise off
PACKED_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
_done = False
_libc: ctypes.CDLL | None = None


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold (once per process; a no-op elsewhere, e.g. musl or macOS, or
    when the user set MALLOC_MMAP_THRESHOLD_ or EDGESTREAM_KEEP_MALLOC=1). True if it was set."""
    global _done, _libc
    if _done:
        return True
    if os.environ.get("EDGESTREAM_KEEP_MALLOC") == "1" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # mallopt's numbering is glibc's
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if _done:
        _libc = libc
        log.debug("glibc mmap threshold fixed at %d bytes", MMAP_THRESHOLD)
    return _done


@contextmanager
def packed_allocations() -> Iterator[None]:
    """While a session is created: blocks below 32 MiB come from the heap, one after another,
    instead of each from a mapping of its own; afterwards the freed holes are handed back
    (malloc_trim) and the fixed threshold restored.

    Why: onnxruntime prepacks every weight into a block of its own (SmolLM2-135M int8: 66 blocks
    of 0.4 to 1.6 MiB, 61 MiB in all). As separate mappings, none of them spans an aligned
    2 MiB range, so `huge_pages` could not collapse them, and a session created early in a
    process (before freed address space lets the kernel merge neighbouring mappings) decoded
    about 6 % slower than the same session created later. Packed in the heap they can be
    collapsed like the rest (154 of 172 MiB instead of 100, resident memory unchanged).
    A no-op where `return_large_blocks` did nothing (not glibc, or the user's own setting)."""
    if not return_large_blocks() or _libc is None:
        yield
        return
    raised = _libc.mallopt(M_MMAP_THRESHOLD, PACKED_THRESHOLD) == 1
    try:
        yield
    finally:
        if raised:
            _libc.malloc_trim(0)  # the transients freed inside the heap go back to the OS
            _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
