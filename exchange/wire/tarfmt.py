"""A strict, streaming ustar writer and reader for the few members a bundle has.

Python's ``tarfile`` accepts far more than a bundle may contain (links, pax and
GNU extensions, sparse files) and reads ahead; this module writes plain ustar
that GNU tar and bsdtar read, and reads back only regular files with plain
names, one header at a time, so limits are checked before any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from exchange.errors import FormatError, LimitError

BLOCK = 512
MAX_USTAR_SIZE = 8**11 - 1  # 11 octal digits


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    mtime: int
    block: bytes = field(default=b"", repr=False, compare=False)  # the header as read


#: ustar header fields by offset, to name the one that differs from what :func:`header` writes
_FIELDS = ((0, "name"), (100, "mode"), (108, "uid"), (116, "gid"), (124, "size"), (136, "mtime"),
           (148, "checksum"), (156, "type"), (157, "link name"), (257, "magic"), (263, "version"),
           (265, "user name"), (297, "group name"), (329, "device numbers"), (345, "prefix"),
           (500, "padding"))


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def header(name: str, size: int, mtime: int) -> bytes:
    """The 512-byte ustar header of a regular file (mode 0644, owner 0)."""
    raw = name.encode("ascii")
    if len(raw) > 100 or "/" in name or not 0 <= size <= MAX_USTAR_SIZE:
        raise FormatError(f"cannot store member {name!r} of {size} bytes in ustar")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(max(0, mtime), 12)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = f"{sum(h):06o}".encode() + b"\0 "
    return bytes(h)


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


END = b"\0" * (2 * BLOCK)


def write_member(dst: BinaryIO, name: str, data: bytes, mtime: int) -> None:
    dst.write(header(name, len(data), mtime))
    dst.write(data)
    dst.write(padding(len(data)))


def _read_exact(src: BinaryIO, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            raise FormatError(f"truncated tar: {what} ends after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _parse_octal(field: bytes, what: str) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text or any(c not in b"01234567" for c in text):
        raise FormatError(f"corrupt tar header: bad {what} field {field!r}")
    return int(text, 8)


def read_header(src: BinaryIO) -> Member | None:
    """The next member's header, or None at the end-of-archive marker."""
    block = _read_exact(src, BLOCK, "tar header")
    if block == b"\0" * BLOCK:
        return None
    stored = _parse_octal(block[148:156], "checksum")
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise FormatError("corrupt tar header: checksum mismatch")
    if block[257:262] != b"ustar":
        raise FormatError("not a ustar archive (bad magic)")
    if block[156:157] not in (b"0", b"\0"):
        raise FormatError(f"tar member of type {block[156:157]!r}: only regular files are allowed")
    if block[345:500].strip(b"\0"):
        raise FormatError("tar member name uses the ustar prefix field: not allowed in a bundle")
    try:
        name = block[0:100].rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError as exc:
        raise FormatError("tar member name is not ASCII") from exc
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise FormatError(f"tar member name {name!r} is not a plain file name")
    return Member(name, _parse_octal(block[124:136], "size"), _parse_octal(block[136:148], "mtime"), block)


def _field_at(offset: int) -> str:
    return next(n for off, n in reversed(_FIELDS) if off <= offset)


def check_exact(m: Member, mtime: int) -> None:
    """The header is byte for byte what :func:`header` writes for this member at ``mtime``.

    Readers accept only the exact bytes the writer produces (docs/FORMAT.md section 2):
    a header field no signature covers (mtime, owner, checksum spelling) changed in
    transit would give the file another SHA-256, which its ack then names.
    """
    if m.mtime != max(0, mtime):
        raise FormatError(f"tar header of {m.name}: mtime {m.mtime} is not the signed creation time "
                          f"{max(0, mtime)}: the file was altered after it was written")
    try:
        want = header(m.name, m.size, mtime)
    except FormatError:
        want = b""
    if m.block != want:
        names = dict.fromkeys(_field_at(i) for i, (a, b) in enumerate(zip(m.block, want)) if a != b)
        name = next((n for n in names if n != "checksum"), "checksum")  # another field changes the checksum too
        raise FormatError(f"tar header of {m.name}: {name} field differs from the header exchange writes "
                          "(only exact bytes are accepted): the file was altered after it was written")


def read_member(src: BinaryIO, expected: str, limit: int, what: str) -> tuple[Member, bytes]:
    """The next member, which must be ``expected``: its header and data (``limit`` checked from the header first)."""
    m = read_header(src)
    if m is None:
        raise FormatError(f"{what}: member {expected!r} missing")
    if m.name != expected:
        raise FormatError(f"{what}: member {m.name!r} where {expected!r} was expected")
    if m.size > limit:
        raise LimitError(f"{what}: {expected} is {m.size} bytes (limit {limit})")
    data = _read_exact(src, m.size, expected)
    skip_padding(src, m.size)
    return m, data


def skip_padding(src: BinaryIO, size: int) -> None:
    pad = _read_exact(src, -size % BLOCK, "tar padding")
    if pad.strip(b"\0"):
        raise FormatError("corrupt tar: non-zero padding after a member")


def expect_end(src: BinaryIO, max_trailing: int = 0) -> None:
    """After the last member: the end marker the writer writes (two zero blocks), then EOF.

    ``max_trailing`` zero bytes more are tolerated (none by default: exact bytes only).
    """
    if read_header(src) is not None:
        raise FormatError("unexpected extra member in tar")
    if _read_exact(src, BLOCK, "end-of-archive marker").strip(b"\0"):
        raise FormatError("unexpected data after the end of the tar archive")
    rest = src.read(max_trailing + 1)
    if len(rest) > max_trailing or rest.strip(b"\0"):
        raise FormatError("unexpected data after the end of the tar archive")
