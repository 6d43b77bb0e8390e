"""Freed memory kept for reuse while fine-tuning.

Every fine-tuning step allocates and frees the same large buffers (soft assignments, one-hot blocks, gradients of a
few to tens of MB). glibc serves blocks over 128 KB by mmap and hands them back on free, so each step faults its
buffers in afresh: on this project's 2-core machine a 16 MB elementwise product took 7.1 ms into a fresh buffer and
1.9 ms into a reused one. Inside `reused_memory` glibc serves blocks up to its 32 MB ceiling from its heap and keeps
what is freed; on exit the defaults come back and the heap's free memory is returned. Elsewhere than glibc nothing
changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_CEILING = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit systems
_NEVER_TRIM = 2**31 - 1
_DEFAULT = 128 << 10  # glibc's starting value for both


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (glibc)
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def reused_memory() -> Iterator[bool]:
    """Keep freed blocks of up to 32 MB for reuse inside the block; yields whether it could (glibc only)."""
    libc = _libc()
    applied = bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_CEILING) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                             _NEVER_TRIM))
    try:
        yield applied
    finally:
        if libc and applied:
            libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT)
            libc.malloc_trim(0)
