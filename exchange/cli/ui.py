"""``exchange ui``: the Data Exchange page on its own, without the service.

Registered on the main command group when ``exchange.cli.main`` loads the command modules.
"""

from __future__ import annotations

from pathlib import Path

import click

from exchange.cli.main import HOME, main


@main.command("ui")
@HOME
@click.option("--port", type=click.IntRange(0, 65535),
              help="Port, 0 for any free one (default: [ui] port, else 8765).")
@click.option("--host", help="Address (default: [ui] host, else 127.0.0.1; elsewhere needs a token).")
def ui(home: Path | None, port: int | None, host: str | None) -> None:
    """Serve the Data Exchange page alone; its Sync button runs a sync cycle itself.

    \b
    Example:
      exchange ui --home /srv/xchg/ho --port 8080
    """
    from exchange.node.home import Node
    from exchange.service.ui.server import serve

    node = Node.open(home)
    node.ensure_folders()
    node.migrate()
    serve(node, host=host, port=port, echo=click.echo)
