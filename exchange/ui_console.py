"""Terminal output: rich progress bars and tables for the CLI (never used by the library)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False)
err = Console(stderr=True)


class RichReporter:
    """Progress bars on stderr, one line per bundle state change."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task: Any = None

    def start(self, task: str, total: int | None = None) -> None:
        self.finish()
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=err, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(task, total=total)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def state(self, file: str, status: str, detail: str = "") -> None:
        colour = {"PROCESSED": "green", "APPLIED": "green", "QUARANTINED": "red", "FAILED": "red",
                  "REJECTED": "red", "HELD": "yellow", "WAITING": "yellow"}.get(status, "cyan")
        err.print(f"{file} [{colour}]{status}[/]" + (f": {detail}" if detail else ""))


def print_inspect(info: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None)
    for k, v in info.items():
        if k in ("tables", "summary", "inner_files", "applied", "parked"):
            continue
        t.add_row(k, str(v))
    console.print(t)
    if "inner_files" in info:
        console.print("inner files: " + ", ".join(f"{f['name']} ({f['size']} B)" for f in info["inner_files"]))
    docs = info.get("summary", {}).get("documents", {})
    if docs:
        dt = Table("document type", "documents", "deletes", "rows", "control totals")
        for name, d in docs.items():
            dt.add_row(name, str(d.get("count")), str(d.get("deletes", 0)), json.dumps(d.get("rows")),
                       json.dumps(d.get("totals")))
        console.print(dt)
    for tb in info.get("tables", []):
        console.print(f"[bold]{tb['table']}[/] {tb['rows']} rows")
        for row in tb["sample"]:
            console.print("   ", row)
    if info.get("kind") == "ack" and "applied" not in info:
        console.print("details: encrypted to the bundle's sender and the auditors "
                      "(pass --home of the sender or --identity to read them)")
    elif info.get("kind") == "ack":
        console.print("applied:", info.get("applied"))
        if info.get("parked"):
            console.print("parked:", info.get("parked"))


def print_status(node: str, view: str, rows: list[Any], parked: list[Any] | None) -> None:
    if view != "parked":
        t = Table("file", "peer", "seq", "documents", "status", "created", "updated", "reason",
                  title=f"{node}: {view}")
        for r in rows:
            docs = ", ".join(f"{k} {v}" for k, v in r.documents.items())
            t.add_row(r.file, r.peer, str(r.seq), docs, r.status, (r.created or "")[:19],
                      (r.updated or "")[:19], r.reason or "")
        console.print(t)
    if parked:
        p = Table("document", "key", "from", "seq", "attempts", "error", title=f"{node}: parked documents")
        for d in parked:
            p.add_row(d.doc_type, d.doc_key, d.peer, str(d.seq), str(d.attempts), d.error)
        console.print(p)
    elif view == "parked":
        console.print("no parked documents")
