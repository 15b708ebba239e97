"""What ``exchange inspect`` and ``exchange verify`` report about one file.

Works without a node home: an auditor passes an ``allowed_signers`` file and,
optionally, an age identity to see inside.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from exchange.errors import AuthenticityError, ExchangeError
from exchange.wire.bundle import BundleReader, read_ack
from exchange.wire.signed import format_time
from exchange.wire.crypto import sshsig
from exchange.wire.formats import parse_name


def describe(path: Path, *, trust: sshsig.AllowedSigners | None,
             identities: Sequence[str] = (), me: str | None = None, sample: int = 5,
             sent_by: str | None = None) -> dict[str, Any]:
    """Everything checkable about ``path``; raises the first problem found.

    ``sent_by``: the node whose ``identities`` these are. A bundle it sent itself is encrypted to its
    recipient only, so it is checked without decrypting (signature, signed hash of the ciphertext)
    and the result says why, rather than failing on a key that was never meant to open it.
    """
    if path.name.endswith(".ack"):
        if trust is None:
            raise ExchangeError("an ack can only be read with a trust store", hint="Pass --trust allowed_signers.")
        ack = read_ack(path, trust, me=me, identities=identities)
        info: dict[str, Any] = {
            "kind": "ack", "file": path.name, "version": ack.version, "acker": ack.acker, "sender": ack.sender,
            "seq": ack.seq, "lane": ack.lane, "result": ack.result, "bundle_sha256": ack.bundle_sha256,
            "created": format_time(ack.created), "signature": f"good, by {ack.acker}", "details": ack.details}
        if ack.heads is not None:
            info["heads"] = ack.heads.as_json()
        if ack.details in ("clear", "decrypted"):  # v2: only with an identity it is encrypted to
            info.update(reason=ack.reason, applied=ack.applied, parked=ack.parked, parked_total=ack.parked_total)
        elif ack.details == "unreadable":
            raise AuthenticityError(f"{path.name}: {ack.details_error}")
        return info
    out: dict[str, Any] = {"kind": "bundle", "file": path.name}
    with BundleReader(path) as r:
        m = r.manifest
        out.update(sender=m.sender, recipient=m.recipient, seq=m.seq, lane=m.lane, prev=m.prev,
                   created=format_time(m.created), app_version=m.app_version,
                   manifest_sha256=m.sha256, payload_bytes=m.payload.size,
                   inner_files=[{"name": e.name, "size": e.size} for e in m.inner])
        try:
            fn = parse_name(path.name)
            out["name_matches"] = (fn.a, fn.b, fn.seq, fn.lane) == (m.sender, m.recipient, m.seq, m.lane)
        except ExchangeError:
            out["name_matches"] = False
        if trust is None:
            out["signature"] = "not checked (no trust store given)"
            out["file_sha256"] = r.check_payload_hash()
            return out
        signer = r.verify_signature(trust)
        out["signature"] = f"good, by {m.sender} ({sshsig.fingerprint(signer.key)})"
        if me is not None:
            r.check_recipient(me)
        if not identities or (sent_by is not None and m.sender == sent_by != m.recipient):
            out["file_sha256"] = r.check_payload_hash()
            out["payload"] = ("ciphertext matches the signed hash (not decrypted: no identity)" if not identities
                              else f"ciphertext matches the signed hash; not decrypted: {sent_by} sent this "
                                   f"bundle, only its recipient {m.recipient} can decrypt it")
            return out
        with tempfile.TemporaryDirectory(prefix=".inspect-") as tmp:
            opened = r.decrypt(identities, Path(tmp))
            out["file_sha256"] = opened.file_sha256
            out["payload"] = "decrypted; every inner file matches its signed hash"
            out["summary"] = opened.summary
            tables = []
            for name in opened.tables:
                t = opened.table(name)
                tables.append({"table": name, "rows": t.num_rows,
                               "sample": [{k: _text(v) for k, v in row.items()}
                                          for row in t.slice(0, sample).to_pylist()]})
            out["tables"] = tables
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _text(value: Any) -> str:
    """A sampled value as text; a zone-aware time as RFC 3339 with its offset (``T``, not a space)."""
    return value.isoformat() if isinstance(value, datetime) else str(value)
