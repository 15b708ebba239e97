"""The latest stick visit's result file, read without loading the stick machinery.

``exchange status`` prints one line from it; importing :mod:`exchange.transport.usb`
for that line would load signing, the work lock and the sync cycle (docs/PERFORMANCE.md,
"Start-up"). :mod:`exchange.transport.usb` writes the file and re-exports these names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exchange.node.home import Node

LAST_RESULT = "usb-last.json"       # in the node home: the latest result, for status pages


def last_usb_result(node: Node | Path) -> dict[str, Any] | None:
    """The latest stick visit of this node (``UsbReceipt.as_json()`` plus ``finished``), or None."""
    home = node.cfg.home if isinstance(node, Node) else Path(node)
    try:
        data = json.loads((home / LAST_RESULT).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
