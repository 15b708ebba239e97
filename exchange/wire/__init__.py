"""The file formats of docs/FORMAT.md: names, tar, bundles and acks, Parquet limits, crypto."""
