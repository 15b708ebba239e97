"""Quarantined files an operator has looked at: set aside as reviewed, or given back to the importer.

A quarantined file stays in ``quarantine/`` with its reason, counted by ``exchange status``, the
page, the HO overview, the metrics and ``doctor``, until a person decides about it; nothing ever
deletes it. Two decisions, each recorded in the operators' journal and in the file's reason file:

- reviewed (:func:`review`): the file and its reason move to ``quarantine/reviewed/``, out of every
  count (a fork a stream restart superseded, a replay, a stick's stray file); still there for auditors;
- retried (:func:`give_back`): the file goes back to the inbox, where the next import checks it
  from the start like any file (a bundle signed by a key trusted since, a store's catalog fixed);
  its old reason goes to ``quarantine/reviewed/`` beside the decision.

A name given must be a quarantined file's exact name (no path), so nothing outside ``quarantine/``
is ever moved; a link or a FIFO moves as itself (:func:`exchange.files.move_entry`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exchange.database import journal
from exchange.errors import ConfigError, NotRegularFileError
from exchange.files import fsync_dir, move_entry, read_regular, utc_now, write_file_atomic
from exchange.node.home import Node
from exchange.receive.setaside import REASON_SUFFIX
from exchange.wire.formats import NODE_ID_RE

#: Below quarantine/: the files an operator has reviewed or given back.
REVIEWED_DIR = "reviewed"


@dataclass(frozen=True)
class Decided:
    """One file an operator decided about: what was done and where it is now."""

    file: str
    peer: str
    action: str  # "reviewed" or "retried"
    now_at: str  # its path relative to the home

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "peer": self.peer, "action": self.action, "now_at": self.now_at}


def names_of(node: Node, names: list[str], peer: str | None) -> list[str]:
    """The quarantined files named, or every one claiming ``peer`` as its sender; each checked to be one."""
    q = node.cfg.quarantine
    found = sorted(p.name[: -len(REASON_SUFFIX)] for p in q.glob("*" + REASON_SUFFIX)) if q.is_dir() else []
    if peer is not None:
        if not NODE_ID_RE.fullmatch(peer):
            raise ConfigError(f"--peer {peer[:40]!r} is not a node id")
        names = [*names, *(n for n in found if n.split(".", 1)[0] == peer)]
    if not names:
        raise ConfigError("no quarantined file to decide about" + (f" from {peer}" if peer else ""),
                          hint="See `exchange status received` (QUARANTINED) for their names.")
    for name in names:
        if name not in found:
            raise ConfigError(f"{name[:120]!r} is not a file in {q} (with its reason file)",
                              hint="Give the exact name `exchange status received` shows, without a folder.")
    return list(dict.fromkeys(names))


def review(node: Node, names: list[str], reason: str, peer: str | None = None) -> list[Decided]:
    """Move each file and its reason to ``quarantine/reviewed/``, the decision in both records."""
    return [_decide(node, name, reason, "reviewed") for name in names_of(node, names, peer)]


def give_back(node: Node, names: list[str], reason: str, peer: str | None = None) -> list[Decided]:
    """Move each file back to the inbox for the next import to check from the start."""
    return [_decide(node, name, reason, "retried") for name in names_of(node, names, peer)]


def _decide(node: Node, name: str, reason: str, action: str) -> Decided:
    q = node.cfg.quarantine
    src, why = q / name, q / (name + REASON_SUFFIX)
    done = q / REVIEWED_DIR
    done.mkdir(parents=True, exist_ok=True)
    try:
        info = json.loads(read_regular(why, 1 << 20))
    except (OSError, ValueError, NotRegularFileError):
        info = {"file": name}
    if not isinstance(info, dict):
        info = {"file": name}
    by, at = journal.actor(), utc_now()
    info["decision"] = {"action": action, "by": by, "at": at.isoformat(), "reason": reason}
    peer = name.split(".", 1)[0] if NODE_ID_RE.fullmatch(name.split(".", 1)[0]) else ""
    slot = _slot(done, name)  # where the reason goes (and the file, when reviewed)
    if action == "reviewed":
        target = slot
    else:
        node.cfg.inbox.mkdir(parents=True, exist_ok=True)
        target = node.cfg.inbox / name
        if os.path.lexists(target):
            raise ConfigError(f"{name} is in the inbox already: import it first, then decide about this copy")
    with node.engine.begin() as conn:  # the journal first: a crash after it leaves the file where it was
        journal.record(conn, f"quarantine {action}", peer or None, file=name, reason=reason)
    write_file_atomic(slot.with_name(slot.name + REASON_SUFFIX), (json.dumps(info, indent=1) + "\n").encode())
    if os.path.lexists(src):
        move_entry(src, target)
    why.unlink(missing_ok=True)
    fsync_dir(q)
    return Decided(name, peer, action, str(target.relative_to(node.cfg.home)))


def reviewed(node: Node) -> list[dict[str, Any]]:
    """The decisions kept in ``quarantine/reviewed/``, oldest first."""
    done = node.cfg.quarantine / REVIEWED_DIR
    out: list[dict[str, Any]] = []
    for p in sorted(done.glob("*" + REASON_SUFFIX)) if done.is_dir() else []:
        try:
            info = json.loads(read_regular(p, 1 << 20))
        except (OSError, ValueError, NotRegularFileError):
            continue
        if isinstance(info, dict) and isinstance(info.get("decision"), dict):
            out.append({"file": p.name[: -len(REASON_SUFFIX)], **info})
    return sorted(out, key=lambda d: str(d["decision"].get("at", "")))


def _slot(folder: Path, name: str) -> Path:
    """``folder/name`` (or ``name.1``, ...) such that neither it nor its reason file exists yet."""
    target, n = folder / name, 1
    while os.path.lexists(target) or os.path.lexists(target.with_name(target.name + REASON_SUFFIX)):
        target, n = folder / f"{name}.{n}", n + 1
    return target
