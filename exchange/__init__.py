"""exchange: signed, encrypted Parquet bundles between a head office and its stores."""

import os

__version__ = "1.1.0"

# Arrow's C++ default allocator is chosen once, when pyarrow loads: malloc rather than mimalloc,
# whose per-thread pages (Parquet decoding uses Arrow's C++ default, whatever pyarrow's default
# is set to) kept an import's peak about 20 MiB higher (docs/PERFORMANCE.md, "Import into SQLite").
# An operator's own setting wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
