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

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value; fixing it turns its dynamic raise off
_done = False


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold (once per process; a no-op elsewhere, e.g. musl or macOS, or
    when the user set MALLOC_MMAP_THRESHOLD_ or EDGESTREAM_KEEP_MALLOC=1). True if it was set."""
    global _done
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
        log.debug("glibc mmap threshold fixed at %d bytes", MMAP_THRESHOLD)
    return _done
