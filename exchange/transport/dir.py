"""The folder transport: a shared folder or a USB stick, one sub-folder per node.

``<root>/<node>/`` holds the files addressed to that node, so one stick can
carry many stores' files without mixing them up; each node takes only its own.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..bundle import fsync_dir, sha256_file
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


class DirTransport:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.address = f"dir:{root}"

    def _box(self, node: str) -> Path:
        box = self.root / node
        try:
            box.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransportError(f"cannot use folder {box}: {exc.strerror}",
                                 hint="Check that the stick or share is mounted and writable.") from exc
        return box

    def push(self, files: Sequence[Path], peer: str) -> list[Path]:
        box = self._box(peer)
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

    def pull(self, me: str, dest: Path) -> list[Path]:
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

    def close(self) -> None:
        pass
