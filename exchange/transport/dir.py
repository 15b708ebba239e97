"""The folder transport: a shared folder or a USB stick, one sub-folder per node.

``<root>/<node>/`` holds the files addressed to that node, so one stick can
carry many stores' files without mixing them up; each node takes only its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import json
from typing import Any
from collections.abc import Sequence
from pathlib import Path

from ..files import fsync_dir, sha256_file
from ..errors import TransportError
from ..faults import crashpoint
from ..formats import PART_SUFFIX, is_exchange_file, parse_name

log = logging.getLogger(__name__)


def durable_copy(src: Path, dst: Path) -> None:
    """Copy to ``dst.part``, fsync, rename: ``dst`` appears only when complete."""
    part = dst.with_name(dst.name + PART_SUFFIX)
    with open(src, "rb") as fi, open(part, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(part, dst)
    fsync_dir(dst.parent)


def probe_folders(boxes: Sequence[Path], me: str, info: Path) -> dict[str, Any]:
    """For `exchange doctor`: each folder writable, its clock, and the peer's ``node-*.json``."""
    out: dict[str, Any] = {}
    for box in boxes:
        test = box / f".probe-{me}{PART_SUFFIX}"
        try:
            test.write_bytes(b"probe")
            out["server_time"] = test.stat().st_mtime
            test.unlink()
        except OSError as exc:
            raise TransportError(f"folder {box} is not writable: {exc.strerror}") from exc
    try:
        out["peer_info"] = json.loads(info.read_text())
    except (OSError, ValueError):
        pass  # not published yet: the doctor reports the version as unknown
    return out


class DirTransport:
    def __init__(self, root: Path, me: str | None = None) -> None:
        self.root = root
        self.me = me
        self.address = f"dir:{root}"

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
        return box

    def push(self, files: Sequence[Path], peer: str) -> list[Path]:
        box = self._box(peer)
        self.publish_info_default(peer)
        done = []
        for f in files:
            target = box / f.name
            try:
                if target.exists() and sha256_file(target) == sha256_file(f):
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
        target = self._box(peer) / f"node-{me}.json"
        tmp = target.with_name(target.name + PART_SUFFIX)
        try:
            tmp.write_text(json.dumps(info))
            os.replace(tmp, target)
        except OSError as exc:  # informative only: never worth failing a delivery for
            tmp.unlink(missing_ok=True)
            log.warning("could not publish node info in %s: %s", target.parent, exc)

    def probe(self, me: str, peer: str) -> dict[str, Any]:
        """Both folders writable; the folder's clock; the peer's published info."""
        return probe_folders([self._box(me), self._box(peer)], me, self.root / me / f"node-{peer}.json")

    def pull(self, me: str, dest: Path) -> list[Path]:
        if not self.root.is_dir():
            raise TransportError(f"transfer folder {self.root} is not available",
                                 hint="Mount the stick or share, or fix the transport address in exchange.toml.")
        box = self.root / me
        if not box.is_dir():
            return []
        got = []
        for src in sorted(box.iterdir()):
            if src.name.endswith(PART_SUFFIX):
                continue  # an interrupted copy by the other side; it will finish or redo it
            if not is_exchange_file(src.name) or parse_name(src.name).b != me:
                continue
            target = dest / src.name
            try:
                if target.exists() and sha256_file(target) != sha256_file(src):
                    log.warning("%s: a different file of that name waits in %s; left on %s",
                                src.name, dest, box)
                    continue
                if not target.exists():
                    durable_copy(src, target)
                crashpoint("pull.copied")
                src.unlink()
            except OSError as exc:
                raise TransportError(f"taking {src.name} from {box} failed: {exc.strerror or exc}") from exc
            got.append(target)
        return got

    me: str | None = None

    def publish_info_default(self, peer: str) -> None:
        if self.me:
            from .. import __version__

            self.publish_info(self.me, peer, {"node": self.me, "version": __version__, "time": time.time()})

    def close(self) -> None:
        pass
