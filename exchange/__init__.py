"""exchange: signed, encrypted Parquet bundles between a head office and its stores."""

import os

__version__ = "1.1.0"

# Arrow's C++ default allocator is chosen once, when pyarrow loads: malloc rather than mimalloc,
# whose per-thread pages (Parquet decoding uses Arrow's C++ default, whatever pyarrow's default
# is set to) kept an import's peak about 20 MiB higher (docs/PERFORMANCE.md, "Import into SQLite").
# An operator's own setting wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

# pyarrow.parquet imports pyarrow.fs, which loads every remote filesystem pyarrow was built with
# (S3 with its own SSL and AWS libraries, GCS, Azure, HDFS): 3.4 MiB of every exporter's and
# importer's memory for code exchange never calls (it reads and writes local files only;
# docs/PERFORMANCE.md, "Peak memory and fan-in"). pyarrow.fs treats each as optional and leaves
# out what cannot be imported. A process that imported them before exchange keeps them.
import sys  # noqa: E402

for _fs in ("_s3fs", "_gcsfs", "_azurefs", "_hdfs"):
    sys.modules.setdefault(f"pyarrow.{_fs}", None)  # type: ignore[arg-type]
del _fs
