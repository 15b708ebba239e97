"""``exchange run``: one long-running process per node home.

A watchdog observer on the inbox only debounces and wakes the main loop; the
main loop calls the same ``import_inbox`` a manual import does, so a file
applies within a second of landing. A schedule runs the full sync cycle every
``sync_interval`` seconds, plus one at start-up. SIGTERM/SIGINT set a flag:
the step in progress finishes (each step is crash-safe anyway) and the loop
stops. A failing step is logged and retried at the next interval; it never
ends the service.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from exchange.errors import ExchangeError
from exchange.node.home import Node
from exchange.node.lock import home_lock, work_lock
from exchange.progress import NullReporter, Reporter
from exchange.receive.importer import import_inbox, retry_parked, wrote_acks
from exchange.receive.locks import try_lock
from exchange.service.sync import push, sync
from exchange.wire.formats import is_exchange_file

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = logging.getLogger(__name__)

DEBOUNCE = 0.2  # seconds of quiet after the last inbox event before importing


@dataclass
class ServiceState:
    """What the service did last; read by the status page and tests."""

    started: float = field(default_factory=time.time)
    last_sync: float | None = None
    last_sync_result: str = ""
    last_sync_ok: bool = True  # the last sync had no error (the page shows it without reading the text)
    last_import: float | None = None
    imports: int = 0
    parked_retries: int = 0  # passes of the parked-documents timer
    syncs: int = 0
    sync_failures: int = 0  # cycles that ended with an error (the metrics' exchange_sync_failures_total)
    errors: int = 0


class _InboxHandler:
    """watchdog handler: any complete exchange file renamed (``mv``, from anywhere) or written into the inbox."""

    def __init__(self, wake: queue.Queue[str], inbox: Path) -> None:
        self.wake = wake
        self.inbox = inbox

    def dispatch(self, event: Any) -> None:
        path = getattr(event, "dest_path", "") or getattr(event, "src_path", "")
        # a rename into place, or the close after a direct write; "created" alone may be half written
        # (Linux reports closes; elsewhere creation is all there is, and the debounce has to do)
        wanted = ("moved", "closed") if sys.platform == "linux" else ("moved", "closed", "created", "modified")
        if event.is_directory or not path or event.event_type not in wanted:
            return
        p = Path(str(path))
        if p.parent == self.inbox and is_exchange_file(p.name) and p.exists():
            self.wake.put(p.name)  # a file that landed, not one the importer just moved away


def _observer(default: Callable[[], BaseObserver]) -> BaseObserver:
    """The inbox observer. On Linux, one that reports a file renamed in from an unwatched folder
    (``mv ~/x.bundle inbox/``) as "moved", not "created": "created" alone is also the first event
    of a direct write, which may still be half written, so the handler cannot act on it."""
    if sys.platform == "linux":
        try:
            from watchdog.observers.inotify import InotifyObserver
        except ImportError:  # no inotify here: watchdog's own choice, and the debounce
            return default()
        return InotifyObserver(generate_full_events=True)
    return default()


class Addon(Protocol):
    """Something that runs beside the service (the web page, the USB watcher)."""

    def start(self, service: Service) -> None: ...
    def stop(self) -> None: ...


class Service:
    def __init__(self, node: Node, *, interval: float | None = None, reporter: Reporter | None = None,
                 on_cycle: Callable[[ServiceState], None] | None = None) -> None:
        self.node = node
        self.interval = float(interval if interval is not None else node.cfg.sync_interval)
        self.reporter = reporter or NullReporter()
        self.state = ServiceState()
        self.stop_event = threading.Event()
        self.wake: queue.Queue[str] = queue.Queue()
        self.on_cycle = on_cycle
        self.addons: list[Addon] = []

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.put("")

    def request_sync(self) -> None:
        """Ask for a sync cycle now (the Sync button)."""
        self._sync_now = True
        self.wake.put("")

    _sync_now = False

    def _import(self) -> None:
        try:
            with work_lock(self.node.cfg.home):
                outs = import_inbox(self.node, reporter=self.reporter)
                if wrote_acks(outs):
                    push(self.node, reporter=self.reporter)  # send acks back without waiting
            self.state.last_import = time.time()
            self.state.imports += 1
        except ExchangeError as exc:
            self.state.errors += 1
            log.error("import failed: %s", exc)
        except Exception:  # the service must outlive any one bad step
            self.state.errors += 1
            log.exception("import failed unexpectedly")

    def _retry_parked(self) -> None:
        """The timer's pass over the parked documents (ORPHANED ones left out): what they lacked may have
        arrived without an import of this node applying anything (a fix in the database, a later sync)."""
        try:
            with work_lock(self.node.cfg.home), try_lock(self.node, "parked") as got:
                if got:
                    applied, still = retry_parked(self.node, orphaned=False)
                    if applied:
                        log.info("parked documents: %d applied on the timer, %d still parked", applied, still)
            self.state.parked_retries += 1
        except ExchangeError as exc:
            self.state.errors += 1
            log.error("parked retry failed: %s", exc)
        except Exception:  # the service must outlive any one bad step
            self.state.errors += 1
            log.exception("parked retry failed unexpectedly")

    def _sync(self) -> None:
        try:
            rep = sync(self.node, reporter=self.reporter)
            self.state.last_sync_result = rep.line() if not rep.errors else "; ".join(rep.errors)
            self.state.last_sync_ok = not rep.errors
            if rep.errors:
                self.state.errors += 1
                self.state.sync_failures += 1
        except ExchangeError as exc:
            self.state.errors += 1
            self.state.sync_failures += 1
            self.state.last_sync_result, self.state.last_sync_ok = f"failed: {exc}", False
            log.error("sync failed, retrying at the next interval: %s", exc)
        except Exception as exc:
            self.state.errors += 1
            self.state.sync_failures += 1
            self.state.last_sync_result, self.state.last_sync_ok = f"failed: {exc}", False
            log.exception("sync failed unexpectedly, retrying at the next interval")
        self.state.last_sync = time.time()
        self.state.syncs += 1

    def run(self) -> ServiceState:
        """Run until ``stop()``; refuses to start if another service holds this home."""
        from watchdog.observers import Observer

        self.node.ensure_folders()
        with home_lock(self.node.cfg.home, "run", timeout=0.5):
            self.node.migrate()
            observer = _observer(Observer)
            observer.schedule(_InboxHandler(self.wake, self.node.cfg.inbox), str(self.node.cfg.inbox), recursive=False)  # type: ignore[arg-type]
            observer.start()
            started: list[Addon] = []
            try:
                for addon in self.addons:
                    addon.start(self)
                    started.append(addon)
                log.info("exchange run: node %s, inbox %s, sync every %.0fs", self.node.id,
                         self.node.cfg.inbox, self.interval)
                self._loop()
            finally:
                for addon in reversed(started):
                    try:
                        addon.stop()
                    except Exception:
                        log.exception("stopping %s failed", type(addon).__name__)
                observer.stop()
                observer.join(timeout=5)
                log.info("exchange run: stopped")
        return self.state

    def _loop(self) -> None:
        next_sync = time.monotonic()  # one cycle at start-up (it imports what is already there)
        every = float(self.node.cfg.parked_retry_interval)
        next_parked = time.monotonic() + every if every > 0 else float("inf")
        while not self.stop_event.is_set():
            if time.monotonic() >= next_parked:
                self._retry_parked()
                next_parked = time.monotonic() + every
                continue
            if self._sync_now or time.monotonic() >= next_sync:
                self._sync_now = False
                self._sync()
                next_sync = time.monotonic() + self.interval
                if self.on_cycle:
                    self.on_cycle(self.state)
                continue
            try:
                self.wake.get(timeout=max(0.0, min(1.0, next_sync - time.monotonic(),
                                                   next_parked - time.monotonic())))
            except queue.Empty:
                continue
            if self.stop_event.is_set():
                break
            # debounce: wait until the inbox is quiet, then import everything there
            deadline = time.monotonic() + DEBOUNCE
            while time.monotonic() < deadline:
                try:
                    self.wake.get(timeout=max(0.0, deadline - time.monotonic()))
                    deadline = time.monotonic() + DEBOUNCE
                except queue.Empty:
                    break
            if not self.stop_event.is_set() and not self._sync_now:
                self._import()


def install_signal_handlers(service: Service) -> None:
    import signal

    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %d: finishing the current step, then stopping", signum)
        service.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
