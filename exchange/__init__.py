"""exchange: signed, encrypted Parquet bundles between a head office and its stores."""

__version__ = "1.0.0"
