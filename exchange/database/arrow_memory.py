"""Where Arrow's memory comes from while exchange moves bundles.

pyarrow's default pool (mimalloc) keeps the pages it frees, per thread:
reading one import bundle's 12 MiB of tables grew the process by 80 MiB with
it and by 28 MiB with malloc (docs/PERFORMANCE.md, "Import memory"). The
importer and the exporter take Arrow memory from malloc for their duration and
hand it back to the OS after each bundle, so a long run stays at the footprint
of one bundle. Buffers remember their pool, so restoring the previous default
afterwards is safe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa


@contextmanager
def system_pool() -> Iterator[pa.MemoryPool]:
    """Arrow allocations from malloc inside the block; trimmed when it ends."""
    previous = pa.default_memory_pool()
    pool = pa.system_memory_pool()
    _fixed_mmap_threshold()
    pa.set_memory_pool(pool)
    try:
        yield pool
    finally:
        pa.set_memory_pool(previous)
        _release(pool)


def trim() -> None:
    """Hand memory freed since the last bundle back to the OS (between bundles)."""
    _release(pa.default_memory_pool())


def _release(pool: pa.MemoryPool) -> None:
    """``pool``'s unused memory back to the OS; for malloc, glibc's ``malloc_trim``.

    Arrow's system pool does not trim (``release_unused`` left 17 MiB of a
    bundle's freed memory in the process, measured here), and what Python and
    SQLite freed comes from the same malloc.
    """
    pool.release_unused()
    if pool.backend_name == "system":
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)


#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h), and the value: its default, held.
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD = -3, 128 * 1024
_LIBC: list[Any] = []
_FIXED: list[bool] = []


def _fixed_mmap_threshold() -> None:
    """Buffers of 128 KiB and more from ``mmap``, always, so each goes back to the OS when freed.

    glibc raises the threshold each time such a buffer is freed, up to its size:
    after the first bundle a bundle's column buffers came from the heap, where
    freed space is reused only as it fits, and each bundle's peak stood a few
    MiB above the one before (138 -> 147 MiB over four bundles of a million
    lines; 136 -> 141 with the threshold held). Once per process.
    """
    if not _FIXED:
        _FIXED.append(True)
        libc = _glibc()
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def _glibc() -> Any:
    """glibc through ctypes, loaded once; None elsewhere (musl, macOS, Windows)."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        lib: Any = None
        try:  # the process's own symbols first: find_library runs `ldconfig -p` (13-22 ms per process)
            candidate: Any = ctypes.CDLL(None)
            if not hasattr(candidate, "malloc_trim"):
                name = ctypes.util.find_library("c")
                candidate = ctypes.CDLL(name) if name else None
            if candidate is not None and hasattr(candidate, "malloc_trim"):
                lib = candidate
        except (OSError, TypeError):  # (TypeError: Windows has no CDLL(None))
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]
