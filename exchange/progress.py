"""A small reporter protocol: library code reports, the edge decides how to show it.

Null by default; the CLI plugs in rich progress bars; services log lines.
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger("exchange")


class Reporter(Protocol):
    def start(self, task: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...
    def state(self, file: str, status: str, detail: str = "") -> None: ...


class NullReporter:
    """Reports nothing but bundle state changes, one log line each."""

    def start(self, task: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass

    def state(self, file: str, status: str, detail: str = "") -> None:
        log.info("%s %s%s", file, status, f": {detail}" if detail else "",
                 extra={"file": file, "status": status, "detail": detail})
