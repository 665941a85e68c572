"""Giving freed memory back to the operating system, and reading how much is available.

Adapters, AdamW moments and snapshots are many small tensors; once freed, glibc keeps their pages
in its heaps (fragmented by tensors that live on), so the process's RSS does not go down.
`malloc_trim(0)` returns those free pages (~25 ms after freeing a few GB). A no-op where the C
library is not glibc. Knows nothing about what was freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand free heap pages back to the OS (after dropping adapters or optimizer state)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _proc_kib(path: str, key: str) -> int | None:
    """A `Key:   N kB` line of a /proc file, in bytes; None where /proc is unavailable (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes(device: torch.device) -> int:
    """What a new allocation on `device` can still get: free GPU memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
