"""Terminal output: rich progress bars and tables for the CLI (never used by the library).

Every value that may come from a peer (file names, reasons, document types and
keys, manifest fields) goes in as a :class:`rich.text.Text` through
:func:`data`: rich never reads markup or emoji codes in it, and control
characters are shown as escapes.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from exchange.logs import escape_controls
from exchange.vocabulary import Tone, tone

COLOURS = {Tone.OK: "green", Tone.INFO: "cyan", Tone.WARN: "yellow", Tone.BAD: "red"}

console = Console(stderr=False)
err = Console(stderr=True)


def data(value: Any, style: str = "") -> Text:
    """A value shown literally: no markup, no emoji codes, control characters escaped."""
    return Text(escape_controls(str(value)), style=style)


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
        colour = COLOURS[tone(status)]
        line = Text.assemble(data(file), " ", data(status, colour))
        if detail:
            line.append_text(Text.assemble(": ", data(detail)))
        err.print(line)


def print_inspect(info: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None)
    for k, v in info.items():
        if k in ("tables", "summary", "inner_files", "applied", "parked"):
            continue
        t.add_row(data(k), data(v))
    console.print(t)
    if "inner_files" in info:
        console.print(data("inner files: " + ", ".join(f"{f['name']} ({f['size']} B)" for f in info["inner_files"])))
    docs = info.get("summary", {}).get("documents", {})
    if docs:
        dt = Table("document type", "documents", "deletes", "rows", "control totals")
        for name, d in docs.items():
            dt.add_row(data(name), data(d.get("count")), data(d.get("deletes", 0)), data(json.dumps(d.get("rows"))),
                       data(json.dumps(d.get("totals"))))
        console.print(dt)
    for tb in info.get("tables", []):
        console.print(Text.assemble(data(tb["table"], "bold"), f" {tb['rows']} rows"))
        for row in tb["sample"]:
            console.print(Text("    ").append_text(data(row)))
    if info.get("kind") == "ack" and "applied" not in info:
        console.print("details: encrypted to the bundle's sender and the auditors "
                      "(pass --home of the sender or --identity to read them)")
    elif info.get("kind") == "ack":
        console.print(Text("applied: ").append_text(data(info.get("applied"))))
        if info.get("parked"):
            console.print(Text("parked: ").append_text(data(info.get("parked"))))


def print_status(node: str, view: str, rows: list[Any], parked: list[Any] | None) -> None:
    if view != "parked":
        t = Table("file", "peer", "seq", "documents", "status", "created", "updated", "reason",
                  title=f"{node}: {view}")
        for r in rows:
            docs = ", ".join(f"{k} {v}" for k, v in r.documents.items())
            t.add_row(data(r.file), data(r.peer), str(r.seq), data(docs), data(r.status), (r.created or "")[:19],
                      (r.updated or "")[:19], data(r.reason or ""))
        console.print(t)
        for r in rows:  # a sent bundle whose ack reports other figures than were sealed
            rec = getattr(r, "reconcile", None)
            if rec and not rec.get("ok", True):
                console.print(Text(f"{r.file}: the ack differs from what was sent: ")
                              .append_text(data("; ".join(rec.get("problems", [])))))
    if parked:
        p = Table("document", "key", "from", "seq", "attempts", "error", title=f"{node}: parked documents")
        for d in parked:
            p.add_row(data(d.doc_type), data(d.doc_key), data(d.peer), str(d.seq), str(d.attempts), data(d.error))
        console.print(p)
    elif view == "parked":
        console.print("no parked documents")
