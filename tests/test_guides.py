"""The README and the guides, followed literally (issue #16): what they promise holds.

Real node homes (the demo's), the real service as a subprocess, the real CLI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from test_service import new_bundles, received_status, service_factory, wait_for  # noqa: F401

# --- docs/SERVICE.md: "applies a file within a second of its landing", whatever way it lands ------


def test_a_bundle_moved_into_the_inbox_with_mv_is_applied(homes: Path, service_factory: object) -> None:
    """`mv` from a folder the service does not watch: inotify says IN_MOVED_TO, which watchdog
    used to report as "created" (ignored as maybe half written) so the file waited for the next
    scheduled sync (an hour here)."""
    store = homes / "s001"
    first, second = new_bundles(homes, 2)
    staging = homes / "staging"  # same filesystem as the inbox, outside it: a rename, not a copy
    staging.mkdir()
    shutil.copy(first, staging / first.name)
    shutil.copy(second, staging / second.name)
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    assert received_status(store, first.name) is None
    subprocess.run(["mv", str(staging / first.name), str(store / "inbox" / first.name)], check=True)
    assert wait_for(lambda: received_status(store, first.name) == "APPLIED", 10), svc.text()
    os.rename(staging / second.name, store / "inbox" / second.name)  # the same from a program
    assert wait_for(lambda: received_status(store, second.name) == "APPLIED", 10), svc.text()
    assert svc.stop() == 0


def test_a_bundle_written_directly_into_the_inbox_is_applied(homes: Path, service_factory: object) -> None:
    """`cp` straight into the inbox (no rename): the close after the write wakes the service."""
    store = homes / "s001"
    bundle = new_bundles(homes)[0]
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    subprocess.run(["cp", str(bundle), str(store / "inbox" / bundle.name)], check=True)
    assert wait_for(lambda: received_status(store, bundle.name) == "APPLIED", 10), svc.text()
    assert svc.stop() == 0
