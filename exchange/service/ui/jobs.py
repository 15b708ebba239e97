"""The page's actions: a sync cycle or a retry, one at a time, in the background.

Beside ``exchange run`` the Sync button asks the service (``request_sync``),
which runs the cycle in its own loop; alone (``exchange ui``) the page runs
the cycle itself in a thread, under the home's work lock like any other
command. Retry always runs here, under the work lock. The page follows the job
through :class:`Activity`, fed by a reporter that records each bundle state
change and the current progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from exchange.errors import ExchangeError
from exchange.node.home import Node
from exchange.progress import NullReporter, Reporter
from exchange.service.metrics import SyncFigures

if TYPE_CHECKING:
    from exchange.service.daemon import Service

log = logging.getLogger(__name__)

#: A service sync not seen finishing after this long is shown as finished with no result.
SERVICE_SYNC_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Line:
    time: float
    text: str
    status: str = ""


class Activity:
    """Recent bundle state changes and the task in progress (thread-safe)."""

    def __init__(self, maxlen: int = 50) -> None:
        self._lock = threading.Lock()
        self._lines: deque[Line] = deque(maxlen=maxlen)
        self.task: str | None = None
        self.done = 0
        self.total: int | None = None

    def add(self, text: str, status: str = "") -> None:
        with self._lock:
            self._lines.append(Line(time.time(), text, status))

    def since(self, t: float) -> list[Line]:
        with self._lock:
            return [line for line in self._lines if line.time >= t]

    def progress(self) -> tuple[str | None, int, int | None]:
        with self._lock:
            return self.task, self.done, self.total

    def set_task(self, task: str | None, total: int | None = None) -> None:
        with self._lock:
            self.task, self.done, self.total = task, 0, total

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n


class TeeReporter:
    """A :class:`~exchange.progress.Reporter` that records into an Activity and passes on."""

    def __init__(self, activity: Activity, inner: Reporter | None = None) -> None:
        self.activity = activity
        self.inner: Reporter = inner or NullReporter()

    def start(self, task: str, total: int | None = None) -> None:
        self.activity.set_task(task, total)
        self.inner.start(task, total)

    def advance(self, n: int = 1) -> None:
        self.activity.advance(n)
        self.inner.advance(n)

    def finish(self) -> None:
        self.activity.set_task(None)
        self.inner.finish()

    def state(self, file: str, status: str, detail: str = "") -> None:
        self.activity.add(f"{file} {status}" + (f": {detail}" if detail else ""), status)
        self.inner.state(file, status, detail)


@dataclass
class Job:
    kind: str  # "sync" or "retry"
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: str = ""
    ok: bool = True
    by_service: bool = False
    baseline_syncs: int = 0
    baseline_errors: int = 0
    peer: str | None = None  # a retry of this peer's bundles and documents only

    @property
    def running(self) -> bool:
        return self.finished is None


class Jobs:
    """Starts and follows the page's actions for one node."""

    def __init__(self, node: Node, service: Service | None = None) -> None:
        self.node = node
        self.service = service
        self.activity = Activity()
        self.reporter = TeeReporter(self.activity)
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._last_sync: Job | None = None
        self._syncs = self._sync_failures = 0  # sync cycles the page ran itself (not the service's)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ reading

    def current(self) -> Job | None:
        """The latest job (running or finished); a service sync is checked for completion here."""
        with self._lock:
            job = self._job
            if job is not None and job.running and job.by_service and self.service is not None:
                state = self.service.state
                if state.syncs > job.baseline_syncs:
                    job.finished = state.last_sync or time.time()
                    job.result = state.last_sync_result
                    job.ok = state.errors == job.baseline_errors
                    self._last_sync = job
                elif time.time() - job.started > SERVICE_SYNC_TIMEOUT:
                    job.finished, job.ok = time.time(), False
                    job.result = "the service did not report the sync"
            return job

    def last_sync(self) -> tuple[float | None, str, bool | None]:
        """(time, result, ok) of the last finished sync this process knows of."""
        self.current()
        candidates: list[tuple[float, str, bool]] = []
        if self.service is not None and self.service.state.last_sync:
            st = self.service.state
            candidates.append((st.last_sync or 0.0, st.last_sync_result, st.last_sync_ok))
        with self._lock:
            own = self._last_sync
        if own is not None and own.finished:
            candidates.append((own.finished, own.result, own.ok))
        if not candidates:
            return None, "", None
        return max(candidates, key=lambda c: c[0])

    def last_sync_time(self) -> float | None:
        return self.last_sync()[0]

    def sync_figures(self) -> SyncFigures:
        """The metrics' sync figures: the service's cycles plus the page's own."""
        last, _result, ok = self.last_sync()
        cycles, failures = self._syncs, self._sync_failures
        if self.service is not None:
            cycles += self.service.state.syncs
            failures += self.service.state.sync_failures
        return SyncFigures(last=last, ok=ok, cycles=cycles, failures=failures)

    # ------------------------------------------------------------ starting

    def start_sync(self) -> str:
        """Start a sync cycle; returns a message for the page."""
        if self.busy():
            return "busy"
        with self._lock:
            if self.service is not None:
                st = self.service.state
                self._job = Job("sync", by_service=True, baseline_syncs=st.syncs, baseline_errors=st.errors)
                self.service.request_sync()
                return "started"
            self._job = Job("sync")
            job = self._job
        self._spawn(job, self._run_sync)
        return "started"

    def start_retry(self, peer: str | None = None) -> str:
        """Retry FAILED bundles and parked documents (``exchange retry``), of ``peer`` only if given."""
        if self.busy():
            return "busy"
        with self._lock:
            self._job = Job("retry", peer=peer)
            job = self._job
        self._spawn(job, self._run_retry)
        return "started"

    def busy(self) -> bool:
        job = self.current()
        return job is not None and job.running

    def wait(self, timeout: float = 60.0) -> Job | None:
        """Wait for the current job to finish (tests and the CLI)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = self.current()
            if job is None or not job.running:
                return job
            time.sleep(0.05)
        return self.current()

    def _spawn(self, job: Job, fn: object) -> None:
        def run() -> None:
            try:
                job.result, job.ok = fn(job)  # type: ignore[operator]
            except ExchangeError as exc:
                job.result, job.ok = f"failed: {exc.message}", False
                log.error("%s from the page failed: %s", job.kind, exc)
            except Exception as exc:  # the page must survive any failure of the job
                job.result, job.ok = f"failed: {type(exc).__name__}: {exc}", False
                log.exception("%s from the page failed unexpectedly", job.kind)
            finally:
                self.activity.set_task(None)
                with self._lock:
                    # recorded as the last sync before it reads as finished: a page drawn in between
                    # showed the job done and no last sync, and stopped refreshing (seen in CI)
                    if job.kind == "sync":
                        self._last_sync = job
                        self._syncs += 1
                        self._sync_failures += 0 if job.ok else 1
                    job.finished = time.time()

        t = threading.Thread(target=run, name=f"exchange-ui-{job.kind}", daemon=True)
        self._thread = t
        t.start()

    def _run_sync(self, job: Job) -> tuple[str, bool]:
        from exchange.service.sync import sync

        rep = sync(self.node, reporter=self.reporter)
        if rep.errors:
            return rep.line() + ": " + "; ".join(rep.errors), False
        return rep.line(), True

    def _run_retry(self, job: Job) -> tuple[str, bool]:
        from exchange.node.lock import work_lock
        from exchange.receive.retry import retry
        from exchange.service.sync import push

        with work_lock(self.node.cfg.home):
            result = retry(self.node, reporter=self.reporter, peer=job.peer)
            if result.acks_due:
                push(self.node, reporter=self.reporter)  # the acks go back at once
        return result.text(), result.ok
