"""Plug-and-sync USB: a transfer stick carries bundles and acks for stores with no network.

A *transfer stick* is any volume with a top-level ``exchange-transfer/`` folder
(``exchange usb prepare PATH`` makes one). Inside is exactly the folder
transport's layout, ``exchange-transfer/<node>/`` holding the files addressed
to that node, so one stick carries many stores' files to the HO and the HO's
files back to many stores; ``receipts/`` holds one signed receipt per visit.

:func:`usb_sync` runs one node's whole cycle against a stick, under the home's
work lock: clean up ``.part`` files an earlier, pulled-out insertion left in
the folders this node uses; take what is addressed to this node (receive
first); import; export; put this node's bundles and acks on the stick; write
a signed receipt. Copies go through :class:`~exchange.transport.dir.DirTransport`
(``.part``, fsync, rename; a source is removed only after its copy is durable),
and files are marked exactly as :func:`exchange.service.sync.push` marks them, so a
stick pulled out at any moment leaves only ``.part`` files behind and the next
insertion finishes the job.

:class:`UsbAddon` runs beside ``exchange run``: it polls the mount roots once a
second and syncs each newly inserted stick once.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import logging
import os
import secrets
import stat
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from exchange import __version__
from exchange.errors import (
    BundleError, BusyError, ExchangeError, FormatError, NotRegularFileError, TransportError,
)
from exchange.files import is_real_dir, kind_of, read_regular, sha256_file, utc_now, write_file_atomic
from exchange.node.home import Node
from exchange.node.lock import work_lock
from exchange.progress import NullReporter, Reporter
from exchange.transport import info_name
from exchange.transport.usb_last import LAST_RESULT, last_usb_result as last_usb_result  # re-exported
from exchange.vocabulary import Outcome
from exchange.wire.crypto import sshsig
from exchange.wire.formats import (
    FORMAT_VERSION, MAX_RECEIPT_BYTES, PART_SUFFIX, RECEIPT_FORMAT, RECEIPT_MEMBERS, RECEIPT_SUFFIX, SIG_NAMESPACE,
    is_exchange_file, parse_name,
)
from exchange.wire.signed import (
    check_format, dump_json, format_time, pack_signed, parse_json, parse_time, unpack_signed, verify_signed,
)

if TYPE_CHECKING:  # the engine modules load on first use: reading the last result stays cheap
    from exchange.service.daemon import Service

log = logging.getLogger(__name__)

TRANSFER_DIR = "exchange-transfer"
RECEIPTS_DIR = "receipts"
STICK_INFO = "stick.json"
README_NAME = "README.txt"
LOCAL_RECEIPTS = "usb-receipts"     # in the node home: a copy of every receipt this node wrote
POLL_INTERVAL = 1.0                 # seconds between looks at the mount roots
STOP_JOIN = 60.0                    # seconds stop() waits for a sync in progress

T = TypeVar("T")

README_TEXT = """\
EXCHANGE TRANSFER STICK
=======================

This stick carries data files between the head office (HO) and stores that
have no network connection. The files are signed and encrypted: nobody can
read them or change them without it being noticed. Losing the stick only
delays the data (it is sent again), but please keep it safe all the same.

At each store and at the head office
------------------------------------
1. Plug the stick into the exchange computer.
2. Wait. Where the exchange service runs, it syncs the stick by itself within
   a few seconds and writes a receipt into exchange-transfer/receipts/.
   Elsewhere the operator runs:   exchange usb sync <the stick's folder>
   and waits for the line that ends "you can remove the stick now".
3. Eject the stick properly ("Safely remove hardware" / "Eject") and take it
   to the next place on your round.

Please do not
-------------
- rename, open, move or delete anything inside exchange-transfer/;
- pull the stick out while it is being written. Nothing is lost if you do,
  but that visit is not finished: plug it in again at the same place.

What is on it
-------------
  <node>/      files waiting for that store, or "ho/" for the head office
  receipts/    one signed receipt per visit: who, when, which files were
               taken, put on the stick and left for others
  stick.json   this stick's id
  *.part       an interrupted copy; the next visit cleans it up
"""


# ---------------------------------------------------------------- the stick

def transfer_folder(stick_root: Path) -> Path:
    """The ``exchange-transfer/`` folder of a stick (its mount point or the folder itself).

    Refused when that folder is a link: whoever wrote the stick could point it
    anywhere on this computer, and the visit would take, write and clean up there.
    """
    stick_root = Path(stick_root)
    for candidate in (stick_root / TRANSFER_DIR, stick_root):
        if candidate.name == TRANSFER_DIR and os.path.islink(candidate):
            raise NotRegularFileError(
                f"{candidate} is a symbolic link, not a folder: this stick is refused "
                "(nothing on it or where the link points was read, written or removed)",
                hint="Make exchange-transfer/ a real folder on the stick (`exchange usb prepare PATH` on a "
                     "clean stick), and find out who made the link.")
    if (stick_root / TRANSFER_DIR).is_dir():
        return stick_root / TRANSFER_DIR
    if stick_root.name == TRANSFER_DIR and stick_root.is_dir():
        return stick_root
    raise TransportError(f"{stick_root} is not a transfer stick (no {TRANSFER_DIR}/ folder on it)",
                         hint="Check the stick is plugged in and mounted; prepare a new stick once "
                              "with `exchange usb prepare PATH`.")


def prepare_stick(path: Path, label: str | None = None) -> Path:
    """Make ``path`` (a mounted volume) a transfer stick; returns its ``exchange-transfer/``.

    Safe to repeat: existing files and the stick's id are kept, README.txt is rewritten.
    """
    path = Path(path)
    if path.name == TRANSFER_DIR:
        path = path.parent
    if not path.is_dir():
        raise TransportError(f"{path} is not a folder",
                             hint="Plug in the stick and give the folder it is mounted on "
                                  "(e.g. /media/USER/LABEL, /Volumes/LABEL or E:\\).")
    transfer = path / TRANSFER_DIR
    try:
        transfer.mkdir(exist_ok=True)
        transfer = transfer_folder(path)  # a link planted in its place is refused
        (transfer / RECEIPTS_DIR).mkdir(exist_ok=True)
        info = transfer / STICK_INFO
        if not info.exists():
            write_file_atomic(info, dump_json({
                "format": "exchange-transfer", "version": FORMAT_VERSION, "id": secrets.token_hex(8),
                "label": label, "prepared": format_time(utc_now())}))
        write_file_atomic(transfer / README_NAME, README_TEXT.replace("\n", "\r\n").encode())
    except OSError as exc:
        raise TransportError(f"cannot prepare {transfer}: {exc.strerror or exc}",
                             hint="Check the stick is writable (not locked) and has free space.") from exc
    return transfer


def stick_id(transfer: Path) -> str | None:
    """The id ``prepare`` wrote into ``stick.json`` (None for a folder made by hand)."""
    try:
        value = json.loads(read_regular(transfer / STICK_INFO, 1 << 16)).get("id")
    except (OSError, ValueError, AttributeError, NotRegularFileError):  # a FIFO here must not hang the visit
        return None
    return value if isinstance(value, str) else None


class _Presence:
    """Is the stick still there? (pulled out: the folder is gone or on another device)

    Compares the device only: FAT file systems do not keep inode numbers stable.
    """

    def __init__(self, transfer: Path) -> None:
        self.path = transfer
        self.device = os.stat(transfer).st_dev

    def __call__(self) -> bool:
        try:
            return os.stat(self.path).st_dev == self.device and self.path.is_dir()
        except OSError:
            return False


def clean_stale_parts(transfer: Path, me: str, peers: Iterable[str]) -> list[str]:
    """Remove ``.part`` files an interrupted insertion left, only where this node works.

    In this node's own folder (only its peers write there) every ``.part`` goes;
    in a peer's folder and in ``receipts/`` only what this node writes (names
    starting with ``<me>.``, ``node-<me>.json.part``, ``.probe-<me>.part``),
    since other stores write into the HO's folder too. Returns the paths
    removed, relative to ``transfer``.
    """
    removed: list[str] = []
    transfer = _real_transfer(transfer)

    def mine(name: str) -> bool:
        return (name.startswith(f"{me}.") or name == info_name(me) + PART_SUFFIX
                or name == f".probe-{me}{PART_SUFFIX}")

    folders: list[tuple[Path, Callable[[str], bool]]] = [(transfer / me, lambda _n: True)]
    folders += [(transfer / p, mine) for p in sorted(set(peers)) if p != me]
    folders.append((transfer / RECEIPTS_DIR, mine))
    for folder, select in folders:
        if not is_real_dir(folder):  # missing, or a link that could lead anywhere: never entered
            if os.path.lexists(folder):
                log.warning("%s on the stick is not a real folder: not cleaned up", folder)
            continue
        for f in sorted(folder.iterdir()):
            if not (f.name.endswith(PART_SUFFIX) and select(f.name)):
                continue
            mode = os.lstat(f).st_mode
            if stat.S_ISDIR(mode):
                log.warning("%s/%s is a folder: left alone", folder.name, f.name)
                continue
            f.unlink()  # the entry itself: a link goes, what it points to is never touched
            removed.append(f"{folder.name}/{f.name}")
            log.info("removed %s/%s (%s) left by an interrupted copy", folder.name, f.name, kind_of(mode))
    return removed


def _real_transfer(transfer: Path) -> Path:
    """``transfer`` when it is a real folder; NotRegularFileError when it is a link."""
    if os.path.islink(transfer):
        return transfer_folder(transfer)  # raises, naming the link
    return transfer


def _files_left(transfer: Path, put: set[str]) -> list[str]:
    out = []
    for box in sorted(transfer.iterdir()):
        if box.name == RECEIPTS_DIR or not is_real_dir(box):  # a linked folder's names stay off the receipt
            continue
        out += [f"{box.name}/{f.name}" for f in sorted(box.iterdir())
                if is_exchange_file(f.name) and f.name not in put and not f.name.endswith(".heartbeat")]
    return out


def _describe(path: Path) -> dict[str, Any]:
    return {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


# ---------------------------------------------------------------- the result

@dataclass
class UsbReceipt:
    """What one insertion did; its signed form is written to ``receipts/`` on the stick."""

    node: str
    stick: str                                   # the exchange-transfer folder used
    created: str = ""                            # UTC, RFC 3339, when the visit finished
    stick_id: str | None = None
    taken: list[dict[str, Any]] = field(default_factory=list)   # {file, size, sha256}
    put: list[dict[str, Any]] = field(default_factory=list)     # {file, size, sha256}
    left: list[str] = field(default_factory=list)               # "<folder>/<file>" still on the stick
    cleaned: list[str] = field(default_factory=list)            # stale .part files removed
    results: dict[str, int] = field(default_factory=dict)       # import outcomes: status -> count
    exported: list[str] = field(default_factory=list)           # bundles sealed during the visit
    errors: list[str] = field(default_factory=list)
    removed: bool = False                        # the stick disappeared during the visit
    receipt: str | None = None                   # path of the signed receipt on the stick
    errnos: set[int] = field(default_factory=set)  # the OS errors behind ``errors`` (not in the receipt)

    @property
    def ok(self) -> bool:
        return not self.errors

    def line(self) -> str:
        r = self.results
        text = (f"took {len(self.taken)}, applied {r.get(Outcome.APPLIED, 0)}, "
                f"acks {r.get(Outcome.PROCESSED, 0) + r.get(Outcome.REJECTED, 0)}, exported {len(self.exported)}, "
                f"put {len(self.put)}, left {len(self.left)} for others")
        for status in (Outcome.QUARANTINED, Outcome.FAILED, Outcome.WAITING, Outcome.HELD):
            if r.get(status):
                text += f", {status.lower()} {r[status]}"
        if self.cleaned:
            text += f", cleaned {len(self.cleaned)} interrupted copies"
        if self.removed:
            text += ", STICK REMOVED TOO EARLY"
        if self.errors:
            text += f", {len(self.errors)} errors"
        return text

    def advice(self) -> str:
        """What the operator or the carrier should do about the errors, in one sentence."""
        if not self.errors:
            return ""
        if self.removed:
            return "The stick was pulled out too early: plug it in again here to finish."
        if errno.ENOSPC in self.errnos:
            return ("The stick is full: delete nothing inside exchange-transfer/, use a bigger stick "
                    "or take it to the HO first, then plug it in here again.")
        if self.errnos & {errno.EROFS, errno.EACCES, errno.EPERM}:
            return "The stick cannot be written: check its lock switch, then plug it in again."
        return "Fix the problem above, then plug the stick in again (or run `exchange usb sync`)."

    def signed_body(self) -> dict[str, Any]:
        """The content of ``receipt.json`` (docs/USB.md)."""
        return {
            "format": RECEIPT_FORMAT, "version": FORMAT_VERSION, "app_version": __version__,
            "node": self.node, "created": self.created, "stick_id": self.stick_id,
            "taken": self.taken, "put": self.put, "left": self.left, "cleaned": self.cleaned,
            "results": self.results, "exported": self.exported, "errors": self.errors,
        }

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["errnos"]
        out["ok"] = self.ok
        out["summary"] = self.line()
        out["advice"] = self.advice()
        return out


def _receipt_bytes(node: Node, body: dict[str, Any]) -> bytes:
    raw = dump_json(body)
    if len(raw) > MAX_RECEIPT_BYTES:  # a huge HO round: keep counts, drop the long lists
        body = {**body, "left": [], "taken": body["taken"][:2000], "put": body["put"][:2000],
                "truncated": True, "counts": {k: len(body[k]) for k in ("taken", "put", "left")}}
        raw = dump_json(body)
    return pack_signed(RECEIPT_MEMBERS, raw, node.signing_key, parse_time(body["created"], "receipt"))


def _write_receipt(node: Node, transfer: Path, rec: UsbReceipt) -> Path:
    folder = transfer / RECEIPTS_DIR
    folder.mkdir(exist_ok=True)  # never parents: the stick must still be there
    if not is_real_dir(folder):
        raise NotRegularFileError(f"{folder} is {kind_of(os.lstat(folder).st_mode)}, not a folder: "
                                  "no receipt written through it")
    stamp = parse_time(rec.created, "receipt").strftime("%Y%m%dT%H%M%SZ")
    name, n = f"{node.id}.{stamp}{RECEIPT_SUFFIX}", 1
    while os.path.lexists(folder / name):
        n += 1
        name = f"{node.id}.{stamp}-{n}{RECEIPT_SUFFIX}"
    data = _receipt_bytes(node, rec.signed_body())
    write_file_atomic(folder / name, data)
    local = node.cfg.home / LOCAL_RECEIPTS
    local.mkdir(exist_ok=True)
    write_file_atomic(local / name, data)
    return folder / name


def read_receipt(path: Path, trust: sshsig.AllowedSigners | None) -> dict[str, Any]:
    """Parse a receipt file; with ``trust``, verify its signature by the node it names.

    Raises a :class:`~exchange.errors.BundleError` subclass for a malformed,
    unknown-version or (with ``trust``) unauthentic receipt.
    """
    try:
        raw, sig, _none, _sha = unpack_signed(path, RECEIPT_MEMBERS, MAX_RECEIPT_BYTES, "receipt")
        body = parse_json(raw, RECEIPT_MEMBERS[0])
        check_format(body, RECEIPT_FORMAT, RECEIPT_MEMBERS[0])  # the integer version, not True or 1.0
        node = body.get("node")
        if not isinstance(node, str):
            raise FormatError("receipt names no node")
        created = parse_time(body.get("created"), "receipt")
        if trust is not None:
            verify_signed(sig, raw, node, trust, created)
    except BundleError as exc:
        raise type(exc)(f"{path.name}: {exc.message}", hint=exc.hint) from exc
    return body


def list_receipts(stick_root: Path, trust: sshsig.AllowedSigners | None = None) -> list[dict[str, Any]]:
    """Every receipt on a stick, oldest first: the receipt's fields plus ``file``,
    ``verified`` (signature checked against ``trust``) and ``error`` (why it is
    not valid; None when valid or when its node is unknown to ``trust``, which
    a store cannot check for another store's receipt)."""
    folder = transfer_folder(stick_root) / RECEIPTS_DIR
    out: list[dict[str, Any]] = []
    if not is_real_dir(folder):
        return out
    files = [f for f in folder.iterdir() if f.name.endswith(RECEIPT_SUFFIX)]
    for f in sorted(files, key=lambda p: (p.name.split(".")[1:], p.name)):
        try:
            body = read_receipt(f, None)
            known = trust is not None and bool(trust.signers_for(str(body["node"]), SIG_NAMESPACE))
            if known:
                read_receipt(f, trust)
            out.append({**body, "file": f.name, "verified": known, "error": None})
        except BundleError as exc:
            out.append({"file": f.name, "node": f.name.split(".")[0], "verified": False,
                        "error": str(exc)})
    return out


# ---------------------------------------------------------------- last result

def _home(node: Node | Path) -> Path:
    return node.cfg.home if isinstance(node, Node) else Path(node)


def _save_last(node: Node | Path, result: dict[str, Any]) -> None:
    result = {**result, "finished": format_time(utc_now())}
    try:
        write_file_atomic(_home(node) / LAST_RESULT, (json.dumps(result, indent=1) + "\n").encode())
    except OSError as exc:  # a status file must never fail the visit
        log.warning("cannot write %s: %s", LAST_RESULT, exc)


# ---------------------------------------------------------------- the visit

def _only_peer(node: Node, peer: str) -> Node:
    """A view of ``node`` with one peer, so ``sync.push`` delivers to that peer's folder only.

    Sharing the engine and keys already loaded; the stick is checked between
    peers, so a pulled stick stops the visit instead of the transport
    re-creating its folders on the computer's own disk.
    """
    view = copy.copy(node)
    view.cfg = dataclasses.replace(node.cfg, peers={peer: node.cfg.peers[peer]})
    return view


def _peers_to_push(node: Node) -> list[str]:
    from exchange.service.sync import due_for_resend

    peers = {parse_name(f.name).b for f in node.cfg.outbox.iterdir() if is_exchange_file(f.name)}
    peers |= set(due_for_resend(node))
    return sorted(p for p in peers if p in node.cfg.peers and node.cfg.peers[p].exchanging)


def usb_sync(node: Node, stick_root: Path, reporter: Reporter | None = None, *,
             lock_timeout: float = 600.0) -> UsbReceipt:
    """One visit of a transfer stick: clean up, take, import, export, put, write a receipt.

    Runs under the home's work lock (waits ``lock_timeout`` seconds, then
    BusyError). Problems with the stick (pulled out, full, read-only) do not
    raise: they are listed in ``errors`` and the next insertion finishes the
    job. The result is also saved for :func:`last_usb_result`.
    """
    r = reporter or NullReporter()
    transfer = transfer_folder(stick_root)
    node.ensure_folders()
    rec = UsbReceipt(node=node.id, stick=str(transfer), stick_id=stick_id(transfer))
    try:
        with work_lock(node.cfg.home, lock_timeout):
            _visit(node, transfer, rec, r)
    except BusyError:
        raise
    except Exception as exc:
        rec.errors.append(f"{type(exc).__name__}: {exc}")
        rec.created = rec.created or format_time(utc_now())
        _save_last(node, rec.as_json())
        raise
    _save_last(node, rec.as_json())
    (log.warning if rec.errors else log.info)("usb %s at %s: %s", node.id, transfer, rec.line())
    return rec


def _note_errnos(rec: UsbReceipt, failures: Iterable[BaseException]) -> None:
    """Keep the OS error numbers behind ``failures`` (an OSError, or one a TransportError wraps)."""
    for exc in failures:
        seen: BaseException | None = exc
        for _ in range(8):  # a bounded walk down the chain of causes
            if seen is None:
                break
            if isinstance(seen, OSError) and seen.errno is not None:
                rec.errnos.add(seen.errno)
            seen = seen.__cause__ or seen.__context__


def _step(rec: UsbReceipt, what: str, fn: Callable[[], T]) -> T | None:
    """Run a step that touches the stick; an OS error (pulled, full) is recorded, not raised."""
    try:
        return fn()
    except (OSError, ExchangeError) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        rec.errors.append(f"{what}: {text}")
        _note_errnos(rec, [exc])
        log.warning("usb %s: %s failed: %s", rec.node, what, text)
        return None


def _visit(node: Node, transfer: Path, rec: UsbReceipt, r: Reporter) -> None:
    from exchange.receive.importer import import_inbox
    from exchange.send.export import export_all
    from exchange.service.health import write_heartbeats
    from exchange.service.sync import SyncReport, pull, push

    present = _Presence(transfer)
    address = f"dir:{transfer}"
    me = node.id
    _ = node.engine  # loaded once, shared by the per-peer views below

    def gone(when: str) -> bool:
        if present():
            return False
        if not rec.removed:
            rec.removed = True
            rec.errors.append(f"the stick was removed {when}; plug it in again to finish")
        return True

    # 1. what an earlier, pulled-out insertion left behind
    r.start("stick: cleaning up interrupted copies")
    rec.cleaned = _step(rec, "cleaning up", lambda: clean_stale_parts(transfer, me, node.cfg.peers)) or []
    r.finish()

    # 2. receive first: take what is addressed to this node
    rep = SyncReport()
    if not gone("before taking files"):
        r.start(f"stick: taking files for {me}")
        _step(rec, "taking files", lambda: pull(node, source=address, reporter=r, report=rep))
        r.finish()
        rec.errors += rep.errors
        _note_errnos(rec, rep.failures)
        rep.errors, rep.failures = [], []
        for name in rep.pulled:
            f = node.cfg.inbox / name
            if f.exists() and parse_name(name).kind != "heartbeat":  # a status file, not business
                rec.taken.append(_describe(f))
                log.info("%s taken from the stick", name)
        gone("while taking files")

    # 3. import and 4. export: local, done even if the stick has gone
    outs = import_inbox(node, reporter=r)
    rec.results = dict(Counter(o.status for o in outs))
    rec.exported = [e.file for e in export_all(node, reporter=r)]

    # 5. put this node's bundles and acks on the stick, peer by peer (heartbeats last, below)
    peers = _peers_to_push(node)
    if peers and not gone("before putting files"):
        r.start(f"stick: putting files for {', '.join(peers[:5])}{' ...' if len(peers) > 5 else ''}",
                len(peers))
        for peer in peers:
            if gone("while putting files"):
                break
            view = _only_peer(node, peer)
            _step(rec, f"putting files for {peer}",
                  lambda: push(view, target=address, reporter=r, report=rep))  # noqa: B023
            rec.errors += rep.errors
            _note_errnos(rec, rep.failures)
            rep.errors, rep.failures = [], []
            r.advance()
        r.finish()
        for name in [*rep.pushed, *rep.resent]:
            f = node.cfg.archive_sent / name
            if f.exists():
                rec.put.append(_describe(f))
        if rec.errors and present():  # e.g. the stick is full: free what our failed copies took
            _step(rec, "removing failed copies", lambda: clean_stale_parts(transfer, me, node.cfg.peers))

    # 5b. a heartbeat for each peer, after every bundle and ack (a full stick takes the business first);
    # status files, not business: they stay off the receipt's lists
    if not rec.errors and not gone("before putting heartbeats"):
        write_heartbeats(node, node.cfg.peers)
        for peer in sorted({parse_name(f.name).b for f in node.cfg.outbox.iterdir()
                            if is_exchange_file(f.name) and parse_name(f.name).kind == "heartbeat"}):
            if peer not in node.cfg.peers or gone("while putting heartbeats"):
                break
            view = _only_peer(node, peer)
            _step(rec, f"putting a heartbeat for {peer}",
                  lambda: push(view, target=address, reporter=r, report=rep))  # noqa: B023
            rec.errors += rep.errors
            _note_errnos(rec, rep.failures)
            rep.errors, rep.failures = [], []

    # 6. the signed receipt
    rec.created = format_time(utc_now())
    if present():
        rec.left = _step(rec, "listing the stick",
                         lambda: _files_left(transfer, {p["file"] for p in rec.put})) or []
        written = _step(rec, "writing the receipt", lambda: _write_receipt(node, transfer, rec))
        rec.receipt = str(written) if written else None
        if written is None and present():
            _step(rec, "removing failed copies", lambda: clean_stale_parts(transfer, me, ()))
    else:
        gone("before the receipt was written")


# ---------------------------------------------------------------- watching mount roots

def default_roots() -> list[tuple[Path, int]]:
    """Where removable volumes appear on this OS, with how many levels down to look."""
    if sys.platform == "win32":  # untested here: CI is Linux
        return [(d, 0) for d in _windows_removable_drives()]
    if sys.platform == "darwin":
        return [(Path("/Volumes"), 1)]
    # /media/<LABEL>, /media/<user>/<LABEL> (udisks), /run/media/<user>/<LABEL>, /mnt/<x>
    return [(Path("/media"), 2), (Path("/run/media"), 2), (Path("/mnt"), 2)]


def _windows_removable_drives() -> list[Path]:
    """Drive letters whose type is DRIVE_REMOVABLE (untested: CI runs Linux)."""
    out: list[Path] = []
    if sys.platform == "win32":
        import ctypes

        drive_removable = 2
        kernel32 = ctypes.windll.kernel32
        mask = kernel32.GetLogicalDrives()
        for i in range(26):
            if mask & (1 << i):
                root = f"{chr(ord('A') + i)}:\\"
                if kernel32.GetDriveTypeW(ctypes.c_wchar_p(root)) == drive_removable:
                    out.append(Path(root))
    return out


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []


def find_sticks(roots: Sequence[str | Path] | None = None) -> list[Path]:
    """Mounted transfer sticks: folders holding ``exchange-transfer/``.

    Each root is looked at itself and two levels down (``/media/<user>/<LABEL>``);
    with ``roots`` None, the OS defaults (:func:`default_roots`).
    """
    spec = default_roots() if roots is None else [(Path(r), 2) for r in roots]
    found: list[Path] = []
    seen: set[str] = set()
    for root, depth in spec:
        level = [root]
        for d in range(depth + 1):
            nxt = []
            for folder in level:
                try:
                    hit = (folder / TRANSFER_DIR).is_dir()
                except OSError:
                    hit = False
                if hit:
                    key = os.path.realpath(folder)
                    if key not in seen:
                        seen.add(key)
                        found.append(folder)
                elif d < depth:
                    nxt += _subdirs(folder)
            level = nxt
    return found


class UsbAddon:
    """Beside ``exchange run``: sync each newly inserted transfer stick once.

    A polling thread (``interval`` seconds; watchdog cannot watch mounts
    reliably) looks for ``exchange-transfer/`` under the roots. A stick counts
    as new when its folder appears where the last look saw none, or on another
    device (a stick swapped between two looks); it is synced once, and not
    again until it is removed and inserted again. A sync that cannot get the work lock quickly is retried at the
    next poll.
    """

    def __init__(self, roots: list[str] | None = None, *, interval: float = POLL_INTERVAL) -> None:
        self.roots = roots
        self.interval = interval
        self.runs = 0
        self.last: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._service_stop: threading.Event | None = None
        self._node: Node | None = None
        self._seen: dict[str, int] = {}  # stick path -> device, while it stays inserted

    # Addon protocol
    def start(self, service: Service) -> None:
        self._node = Node(service.node.cfg)  # its own engine: this runs in another thread
        self._service_stop = service.stop_event
        self._stop.clear()
        roots = ", ".join(str(r) for r in self.roots) if self.roots is not None else \
            ", ".join(str(r) for r, _ in default_roots()) or "(no removable drives now)"
        log.info("usb: watching %s for a transfer stick", roots)
        self._thread = threading.Thread(target=self._loop, name="exchange-usb", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_JOIN)
            if self._thread.is_alive():
                log.warning("usb: a stick sync is still running; leaving it to finish on exit")
            self._thread = None
        if self._node is not None and "engine" in self._node.__dict__:
            self._node.engine.dispose()

    def _stopping(self) -> bool:
        return self._stop.is_set() or bool(self._service_stop and self._service_stop.is_set())

    def _loop(self) -> None:
        while not self._stopping():
            try:
                self.poll_once()
            except Exception:  # the watcher must outlive any one bad stick
                log.exception("usb: watching for sticks failed")
            self._stop.wait(self.interval)

    def poll_once(self, node: Node | None = None) -> list[UsbReceipt]:
        """One look at the roots; syncs each stick inserted since the last look."""
        node = node or self._node
        assert node is not None, "start() first, or pass the node"
        present: dict[str, int] = {}
        for stick in find_sticks(self.roots):
            try:
                present[str(stick)] = os.stat(stick / TRANSFER_DIR).st_dev
            except OSError:
                continue
        done = []
        for path, ident in present.items():
            if self._seen.get(path) == ident or self._stopping():
                continue
            try:
                rec = usb_sync(node, Path(path), lock_timeout=max(0.5, self.interval))
            except BusyError:
                log.debug("usb: %s waits for the work lock", path)
                continue  # not marked seen: tried again at the next poll
            except ExchangeError as exc:
                log.error("usb %s at %s failed: %s", node.id, path, exc)
                self.last = last_usb_result(node)
            except Exception:
                log.exception("usb %s at %s failed unexpectedly", node.id, path)
                self.last = last_usb_result(node)
            else:
                done.append(rec)
                self.last = rec.as_json()
            self.runs += 1
            self._seen[path] = ident
        for path in list(self._seen):
            if path not in present:
                log.info("usb: stick at %s removed", path)
                del self._seen[path]
        return done

