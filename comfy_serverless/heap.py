"""How the process uses glibc's heap: one arena for every thread, freed memory kept for reuse, pages handed back.

Linux/glibc only; elsewhere every function here is a no-op. Only ctypes is imported (1.4 ms), so the server's
front can call share_one_arena() before it starts any thread.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

_PAGE_SIZE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc mallopt parameters


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()


def _mallopt(parameter: int, value: int) -> None:
    if _libc is not None and hasattr(_libc, "mallopt"):
        _libc.mallopt(parameter, value)


# glibc gives each thread that allocates its own arena of 64 MB heaps, and the server samples on its prompt-worker
# thread: the VAE's large activations then missed the memory keep_freed_memory() keeps and paid fresh page faults
# on every decode. One arena for all threads (the server has one compute thread; the others allocate little):
# under the AVX2 cap (coldsteps, 2026-12-01) a 256 px VAE decode 1.90 -> 1.37 s in the first prompt and
# 1.36-1.42 -> 1.21-1.33 s warm, the first UNet step ~0.3 s shorter, peak RSS unchanged (4.75-4.80 GB).
def share_one_arena() -> None:
    """Every thread allocates from the main arena; call it before any thread exists (new arenas only)."""
    _mallopt(_M_ARENA_MAX, 1)


# glibc serves every allocation over 32 MB with its own mmap and unmaps it on free, so each such activation
# (a 128-channel 256x256 fp32 VAE tensor is 33.5 MB; the UNet's packed weights are allocated on its first call)
# pays fresh zero-filled page faults. Taking them from the heap, which keeps what is freed, avoids that: under
# the AVX2 cap (benchmarks/kernel_peak.py conditions, 2026-12-01) the first UNet call went 3.18 -> 2.82 s and a VAE
# decode at 256 px 1.43 -> 1.22 s, for about 0.35 GB more resident memory after the first image (fp32).
def keep_freed_memory() -> None:
    """Large allocations come from the heap, and what is freed stays there for the next one."""
    _mallopt(_M_MMAP_MAX, 0)
    _mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def release_pages(tensor) -> None:
    """madvise(DONTNEED) the pages that lie wholly inside a tensor about to be dropped. For a file mapping
    they are read again from the file if ever touched; for heap memory the allocator gets zero pages back."""
    if _libc is None:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _PAGE_SIZE) * _PAGE_SIZE, end // _PAGE_SIZE * _PAGE_SIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
