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

import pyarrow as pa


@contextmanager
def system_pool() -> Iterator[pa.MemoryPool]:
    """Arrow allocations from malloc inside the block; trimmed when it ends."""
    previous = pa.default_memory_pool()
    pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield pool
    finally:
        pa.set_memory_pool(previous)
        pool.release_unused()  # malloc_trim


def trim() -> None:
    """Hand memory freed since the last bundle back to the OS (between bundles)."""
    pa.default_memory_pool().release_unused()
