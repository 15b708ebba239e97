"""The command line, thin over the library."""

from exchange.cli.main import main

__all__ = ["main"]
