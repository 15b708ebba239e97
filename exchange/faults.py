"""Named crash points for the crash-injection tests and tools.

``crashpoint("export.sealed")`` kills the process with SIGKILL when the
environment variable ``EXCHANGE_CRASH_AT`` names that point (optionally
``name:N`` to die on the N-th time it is reached). It costs one dict lookup
otherwise. The points a sync cycle reaches are ``POINTS`` (tests/test_crash.py
iterates over them with ``exchange sync``); ``PRUNE_POINTS`` are reached by
``exchange archive prune`` (tests/test_diskfull.py, tools/campaign.py);
``ALL_POINTS`` is both. ``ROTATE_POINTS`` are reached by ``exchange keys rotate``
(tests/test_key_rotation.py).
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "export.sealed",         # bundle .part written and fsynced, transaction not committed
    "export.committed",      # seq and EXPORTED recorded, .part not yet renamed
    "import.decrypted",      # payload decrypted and checked, nothing applied
    "import.applied",        # documents written, transaction not committed
    "import.committed",      # stream position and ack stored, ack file not written
    "import.acked",          # ack file written, bundle not archived
    "ack.committed",         # sent bundle PROCESSED, ack not archived
    "push.copied",           # file durable at the peer, not yet marked UPLOADED
    "pull.copied",           # file durable in the inbox, source not yet removed
)

PRUNE_POINTS = (
    "prune.checkpointed",    # checkpoint durable in archive/checkpoints, the files it records not yet deleted
)

ALL_POINTS = POINTS + PRUNE_POINTS
ROTATE_POINTS = (
    "rotate.prepared",       # new keys complete in keys/next/, nothing announced (made again by the next run)
    "rotate.committed",      # keys/rotation.json written (the notice), this node not yet switched to the new keys
    "rotate.switching",      # the old signing key moved aside, the new one not yet in its place
)

_counts: dict[str, int] = {}


def crashpoint(name: str) -> None:
    target = os.environ.get("EXCHANGE_CRASH_AT")
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
