"""The folder transport: a shared folder or a USB stick, one sub-folder per node.

``<root>/<node>/`` holds the files addressed to that node, so one stick can
carry many stores' files without mixing them up; each node takes only its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import json
from typing import Any
from collections.abc import Sequence
from pathlib import Path

from exchange.errors import NotRegularFileError, TransportError
from exchange.transport import Transport, info_name, node_info
from exchange.faults import crashpoint
from exchange.files import (
    check_regular, create_fresh, is_regular_entry, kind_of, open_regular, publish, read_regular, refuse, sha256_file,
    write_file_atomic,
)
from exchange.wire.formats import PART_SUFFIX, is_exchange_file, parse_name

log = logging.getLogger(__name__)


def durable_copy(src: Path, dst: Path) -> None:
    """Copy to ``dst.part``, fsync, rename: ``dst`` appears only when complete.

    The source is opened only if it is a regular file (never through a link,
    never a FIFO); ``dst.part`` is created fresh, so a link planted at that
    name is removed, not written through.
    """
    part = dst.with_name(dst.name + PART_SUFFIX)
    with open_regular(src) as fi, create_fresh(part) as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    publish(part, dst)  # rename, then fsync the folder


def same_file_there(target: Path, src: Path) -> bool:
    """Is ``target`` already a regular file with ``src``'s bytes? (anything else there: no, and it is replaced)"""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise refuse(target, st.st_mode)  # a rename cannot replace a folder: say so, touch nothing
    if not stat.S_ISREG(st.st_mode):
        log.warning("%s in %s is %s: replaced by the real file, its target untouched",
                    target.name, target.parent, kind_of(st.st_mode))
        return False
    return sha256_file(target) == sha256_file(src)


def real_folder(folder: Path, what: str, hint: str) -> Path:
    """``folder`` itself, when it is a folder and not a link to one (a link could lead anywhere)."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        raise TransportError(f"{what} {folder} does not exist", hint=hint) from None
    except OSError as exc:
        raise TransportError(f"cannot use {what} {folder}: {exc.strerror or exc}", hint=hint) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise NotRegularFileError(f"{what} {folder} is {kind_of(st.st_mode)}, not a folder: refused "
                                  "(nothing in it was read, written or removed)")
    return folder


def probe_folders(boxes: Sequence[Path], me: str, info: Path) -> dict[str, Any]:
    """For `exchange doctor`: each folder writable, its clock, and the peer's ``node-*.json``."""
    out: dict[str, Any] = {}
    for box in boxes:
        test = box / f".probe-{me}{PART_SUFFIX}"
        try:
            with create_fresh(test) as f:
                f.write(b"probe")
            out["server_time"] = os.lstat(test).st_mtime
            test.unlink()
        except OSError as exc:
            raise TransportError(f"folder {box} is not writable: {exc.strerror}") from exc
    try:
        out["peer_info"] = json.loads(read_regular(info, 1 << 16))
    except (OSError, ValueError, NotRegularFileError):
        pass  # not published yet (or not a plain file): the doctor reports the version as unknown
    return out


def take_file(src: Path, target: Path, box: Path) -> bool:
    """Copy ``src`` into ``target`` durably, then remove ``src``; False if a different file waits there.

    NotRegularFileError when ``src`` is a link, FIFO, folder... (or a folder holds ``target``'s
    name): nothing is opened, copied or removed then.
    """
    check_regular(src)
    there = os.path.lexists(target)
    if there and is_regular_entry(target):
        if sha256_file(target) != sha256_file(src):
            log.warning("%s: a different file of that name waits in %s; left on %s", src.name, target.parent, box)
            return False
    else:
        if there:
            same_file_there(target, src)  # a folder: refused; a link or FIFO: replaced as an entry
        durable_copy(src, target)
    crashpoint("pull.copied")
    src.unlink()
    return True


class DirTransport:
    def __init__(self, root: Path, me: str | None = None) -> None:
        self.root = root
        self.me = me
        self.address = f"dir:{root}"
        self.refused: list[str] = []  # what the last pull left alone: links, FIFOs, folders named like files

    def _box(self, node: str) -> Path:
        if not self.root.is_dir():  # never re-create a pulled-out stick's folders on the local disk
            raise TransportError(f"transfer folder {self.root} is not available",
                                 hint="Mount the stick or share, or create the folder first.")
        box = self.root / node
        try:
            box.mkdir(exist_ok=True)
        except OSError as exc:
            raise TransportError(f"cannot use folder {box}: {exc.strerror}",
                                 hint="Check that the stick or share is mounted and writable.") from exc
        return real_folder(box, "folder", "Check that the stick or share is mounted and writable.")

    def push(self, files: Sequence[Path], peer: str) -> list[Path]:
        box = self._box(peer)
        self.publish_info_default(peer)
        done = []
        for f in files:
            target = box / f.name
            try:
                if same_file_there(target, f):
                    done.append(f)
                    continue
                durable_copy(f, target)
            except OSError as exc:
                raise TransportError(f"copying {f.name} to {box} failed: {exc.strerror or exc}",
                                     hint="Free space on the stick or share, then sync again.") from exc
            done.append(f)
        return done

    def publish_info(self, me: str, peer: str, info: dict[str, Any]) -> None:
        """Leave ``node-<me>.json`` (version, time) where ``peer`` looks, for its doctor."""
        target = self._box(peer) / info_name(me)
        try:
            write_file_atomic(target, json.dumps(info).encode())
        except (OSError, NotRegularFileError) as exc:  # informative only: never worth failing a delivery for
            log.warning("could not publish node info in %s: %s", target.parent, exc)

    def probe(self, me: str, peer: str) -> dict[str, Any]:
        """Both folders writable; the folder's clock; the peer's published info."""
        return probe_folders([self._box(me), self._box(peer)], me, self.root / me / info_name(peer))

    def pull(self, me: str, dest: Path) -> list[Path]:
        if not self.root.is_dir():
            raise TransportError(f"transfer folder {self.root} is not available",
                                 hint="Mount the stick or share, or fix the transport address in exchange.toml.")
        box = self.root / me
        self.refused = []
        if not os.path.lexists(box):
            return []
        real_folder(box, "folder", "Remove the link from the stick or share; only real folders are used.")
        got = []
        for src in sorted(box.iterdir()):
            if src.name.endswith(PART_SUFFIX):
                continue  # an interrupted copy by the other side; it will finish or redo it
            if not is_exchange_file(src.name) or parse_name(src.name).b != me:
                continue
            target = dest / src.name
            try:
                taken = take_file(src, target, box)
            except NotRegularFileError as exc:
                self.refused.append(str(exc))
                log.warning("%s", exc)
                continue
            except OSError as exc:
                raise TransportError(f"taking {src.name} from {box} failed: {exc.strerror or exc}") from exc
            if taken:
                got.append(target)
        return got

    def publish_info_default(self, peer: str) -> None:
        if self.me:
            self.publish_info(self.me, peer, node_info(self.me))

    def close(self) -> None:
        pass


_: type[Transport] = DirTransport  # mypy checks the class against the Transport protocol
