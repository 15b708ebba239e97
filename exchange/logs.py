"""Logging for the CLI and the service: human lines on a terminal, JSON lines for services.

The library only logs to ``logging.getLogger(__name__)``; handlers are set here,
at the edge.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    FIELDS = ("file", "status", "detail", "peer", "seq")

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for f in self.FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(verbose: int = 0, as_json: bool = False) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
        level = min(level, logging.INFO)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("exchange")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if verbose < 2:
        logging.getLogger("paramiko").setLevel(logging.WARNING)
