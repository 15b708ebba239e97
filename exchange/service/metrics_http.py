"""``exchange run`` serving ``/metrics`` on 127.0.0.1 without the web page.

``[metrics] port`` in ``exchange.toml`` (or ``exchange run --metrics-port``)
starts :class:`MetricsAddon`: prometheus_client's own small HTTP server, on
loopback only (the figures name every peer; a Prometheus elsewhere reaches it
through the host's node_exporter-style proxy or an SSH tunnel), answering the
same collector the page serves. The sync figures are the service's own.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from exchange.errors import ConfigError
from exchange.service.metrics import SyncFigures, make_registry

if TYPE_CHECKING:
    from exchange.node.home import Node
    from exchange.service.daemon import Service, ServiceState

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def wanted_port(node: Node, option: int | None) -> int | None:
    """The port to serve the metrics on: ``--metrics-port``, else ``[metrics] port``; None (or 0): off."""
    if option is not None:
        return option or None
    section = node.cfg.extra.get("metrics", {})
    port = section.get("port") if isinstance(section, dict) else section
    if port is None or port == 0:
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{node.cfg.home / 'exchange.toml'} [metrics] port: {port!r} is not a TCP port",
                          hint="Write `port = 9810` (a number from 1 to 65535) under [metrics], or remove it.")
    return port


def figures_of(state: ServiceState) -> SyncFigures:
    """The metrics' sync figures of a running service."""
    return SyncFigures(last=state.last_sync, ok=state.last_sync_ok if state.last_sync else None,
                       cycles=state.syncs, failures=state.sync_failures)


class MetricsAddon:
    """``/metrics`` beside the service, on ``127.0.0.1:port`` (port 0: any free port, for tests)."""

    def __init__(self, port: int) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics port {port} is not a TCP port",
                              hint="Set [metrics] port (or --metrics-port) to a number from 1 to 65535.")
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, service: Service) -> None:
        registry = make_registry(service.node, lambda: figures_of(service.state))
        try:
            self._server, self._thread = start_http_server(self.port, addr=HOST, registry=registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve the metrics on {HOST}:{self.port}: {exc.strerror or exc}",
                              hint="Another process uses this port: choose another [metrics] port.") from exc
        log.info("metrics on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def url(self) -> str | None:
        """``http://127.0.0.1:PORT/`` once started (the port actually bound)."""
        if self._server is None:
            return None
        return f"http://{HOST}:{self._server.server_address[1]}/"
