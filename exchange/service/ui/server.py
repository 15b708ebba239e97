"""The Data Exchange window: a Starlette app with Jinja2 pages, served by uvicorn.

Server-rendered HTML, one stylesheet and one small script of its own (nothing
fetched from elsewhere, so the page works on a store's offline PC, and works
without the script). While a sync or retry runs the script redraws the sync
part every second (the rest of the page, and the keyboard focus, stay put),
showing "syncing..." with the bundle state changes as they happen; without
script a meta refresh every 5 s does it. The script also shows every time in
the viewer's own time zone. ``/api/status`` gives the same as JSON.

- :func:`create_app` builds the app for a node (with the service when inside
  ``exchange run``).
- :class:`UiAddon` is the service add-on ``exchange run --ui-port`` starts.
- :func:`serve` runs the page alone (``exchange ui``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from exchange import __version__
from exchange.errors import ConfigError
from exchange.node import settings
from exchange.node.home import Node
from exchange.service.ui import data
from exchange.service.ui.jobs import Jobs
from exchange.service.ui.security import COOKIE, TOKEN_ENV, Guard, check_bind, host_allowed, is_loopback
from exchange.vocabulary import tone

if TYPE_CHECKING:
    import uvicorn

    from exchange.service.daemon import Service

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
DEFAULT_PORT = 8765
DEFAULT_SILENT_MINUTES = 60.0
NOTICES = {
    "busy": "Another sync or retry is still running; wait for it to finish.",
    "started": "",
    "resolved": "Resolved: the version kept goes to the other side with the next sync.",
}


# ---------------------------------------------------------------- settings

@dataclass
class UiSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    silent_after_minutes: float = DEFAULT_SILENT_MINUTES

    @classmethod
    def for_node(cls, node: Node, *, host: str | None = None, port: int | None = None,
                 token: str | None = None, silent_after_minutes: float | None = None) -> UiSettings:
        """Arguments first, then ``EXCHANGE_UI_TOKEN`` (token only), then ``[ui]`` in exchange.toml."""
        ui = node.cfg.extra.get("ui", {})
        if not isinstance(ui, dict):
            raise ConfigError("[ui] in exchange.toml must be a table")
        try:
            silent = float(silent_after_minutes if silent_after_minutes is not None
                           else settings.silent_minutes(ui, DEFAULT_SILENT_MINUTES))
            port_ = int(port if port is not None else ui.get("port", DEFAULT_PORT))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[ui] in exchange.toml: {exc}") from exc
        tok = token or os.environ.get(TOKEN_ENV) or ui.get("token") or None
        return cls(host=str(host or ui.get("host") or "127.0.0.1"), port=port_,
                   token=str(tok) if tok else None, silent_after_minutes=silent)


# ---------------------------------------------------------------- formatting

def _dt(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, datetime):
        return data.aware(value)
    if isinstance(value, str):  # RFC 3339, as the --json views and exchange.send.setaside give it
        try:
            return data.aware(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def fmt_when(value: Any) -> Markup | str:
    """A ``<time>`` with the RFC 3339 instant: the page's script shows it in the viewer's time zone;
    without script it reads as the server's local time, with its UTC offset (never an unnamed zone)."""
    t = _dt(value)
    if t is None:
        return "-"
    local = t.astimezone()
    offset = local.strftime("%z")
    shown = local.strftime("%Y-%m-%d %H:%M:%S ") + f"{offset[:3]}:{offset[3:]}"
    return Markup('<time datetime="{}">{}</time>').format(local.isoformat(timespec="seconds"), shown)


def fmt_iso(value: Any) -> str:
    t = _dt(value)
    return t.isoformat() if t else ""


def fmt_ago(value: Any) -> str:
    t = _dt(value)
    if t is None:
        return "never"
    secs = (datetime.now(UTC) - t).total_seconds()
    if secs < 5:
        return "just now"
    return data.duration(max(0.0, secs)) + " ago"


def fmt_age(seconds: float | None) -> str:
    return "-" if seconds is None else data.duration(max(0.0, seconds))


def fmt_docs(docs: dict[str, int]) -> Markup:
    if not docs:
        return Markup('<span class="muted">-</span>')
    return Markup(", ").join(Markup("{} <b>{}</b>").format(k, v) for k, v in docs.items())


def status_class(status: str) -> str:
    return str(tone(status))


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")),
                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=fmt_when, iso=fmt_iso, ago=fmt_ago, age=fmt_age, docs=fmt_docs,
                       status_class=status_class)
    return env


# ---------------------------------------------------------------- the app

class UiContext:
    """Everything a request handler needs, shared by the app's handlers."""

    def __init__(self, node: Node, settings: UiSettings, service: Service | None) -> None:
        from exchange.service.metrics import make_registry

        self.node = node
        self.settings = settings
        self.service = service
        self.jobs = Jobs(node, service)
        self.guard = Guard(settings.token)
        self.env = _env()
        self.registry = make_registry(node, self.jobs.sync_figures)
        # without a token, only loopback Host names are answered (DNS rebinding); with one, the token guards
        self.loopback_only = is_loopback(settings.host) and not settings.token

    def session(self, request: Request) -> str:
        return request.cookies.get(COOKIE, "") if self.settings.token else ""

    def render_plain(self, request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        """A page that shows nothing of the node's data (sign-in, errors)."""
        base = {"node": self.node, "role": self.node.cfg.role, "version": __version__, "plain": True,
                "running": False, "token_required": bool(self.settings.token)}
        base.update(ctx)
        return HTMLResponse(self.env.get_template(name).render(**base), status_code=status_code)

    def render(self, request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        job = self.jobs.current()
        # read once, before the last sync: a job that finishes while the page is drawn is recorded as
        # the last sync before it reads as finished, so "not running" here always finds its result
        running = bool(job and job.running)
        last_time, last_result, last_ok = self.jobs.last_sync()
        fallback = None if last_time else data.last_activity(self.node)
        activity: list[Any] = self.jobs.activity.since(job.started) if job else []
        task, done, total = self.jobs.activity.progress()
        base = {
            "node": self.node, "role": self.node.cfg.role, "version": __version__,
            "csrf": self.guard.csrf_token(self.session(request)), "path": _here(request),
            "job": job, "running": running, "activity": activity[-20:],
            "task": task, "task_done": done, "task_total": total,
            "last_sync": last_time, "last_result": last_result, "last_ok": last_ok,
            "last_activity": fallback, "service": self.service is not None,
            "notice": NOTICES.get(request.query_params.get("notice", ""), ""),
            "now": datetime.now(UTC), "token_required": bool(self.settings.token),
        }
        base.update(ctx)
        if "problems" not in base:
            base["problems"] = data.problems(self.node, data.peer_stats(self.node).values())
        html = self.env.get_template(name).render(**base)
        return HTMLResponse(html, status_code=status_code)


def _here(request: Request) -> str:
    q = request.url.query
    return request.url.path + (f"?{q}" if q else "")


def _safe_next(value: str | None) -> str:
    """A local path to go back to after a POST (never another site)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _with_notice(path: str, notice: str) -> str:
    base, _, query = path.partition("?")
    params = [(k, v) for k, vs in parse_qs(query).items() for v in vs if k != "notice"]
    if notice and NOTICES.get(notice):
        params.append(("notice", notice))
    return base + ("?" + urlencode(params) if params else "")


def _ctx(request: Request) -> UiContext:
    ctx: UiContext = request.app.state.ui
    return ctx


class AccessMiddleware(BaseHTTPMiddleware):
    """Host check (loopback binds), token check, and security headers on every answer."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        ctx = _ctx(request)
        if ctx.loopback_only and not host_allowed(request.headers.get("host", "")):
            return PlainTextResponse("unknown host", status_code=421)
        path = request.url.path
        public = path.startswith("/static/") or path == "/login"
        if not public and not ctx.guard.authorized(dict(request.headers), request.cookies.get(COOKIE)):
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                resp: Response = ctx.render_plain(request, "login.html", 401, failed=False,
                                                  next=_here(request))
            else:
                resp = PlainTextResponse("token required", status_code=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="exchange"'})
        else:
            resp = await call_next(request)
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self'; "
            "form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
        return resp


def home(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.node.cfg.role == "ho":
        return _ho_page(request, ctx)
    return _store_page(request, ctx)


def _tab_data(ctx: UiContext, tab: str, peer: str | None) -> dict[str, Any]:
    node = ctx.node
    out: dict[str, Any] = {"tab": tab}
    if tab == "sent":
        out["bundles"], out["bundles_total"] = data.sent_bundles(node, peer)
    elif tab == "parked":
        out["parked"], out["parked_total"] = data.parked_docs(node, peer)
    elif tab == "checks":
        from exchange.service.doctor import run_checks

        out["checks"] = run_checks(node)
    else:
        out["tab"] = "received"
        out["bundles"], out["bundles_total"] = data.received_bundles(node, peer)
    return out


def _store_page(request: Request, ctx: UiContext) -> Response:
    node = ctx.node
    tab = request.query_params.get("tab", "received")
    stats = data.peer_stats(node)
    summary = {
        "out": sum(s.sent_waiting for s in stats.values()),
        "unacked": sum(s.sent_unacked for s in stats.values()),
        "oldest": min((s.oldest_unacked for s in stats.values() if s.oldest_unacked), default=None),
        "in": sum(s.received_waiting for s in stats.values()),
        "failed": sum(s.received_failed + s.received_held for s in stats.values()),
        "parked": sum(s.parked for s in stats.values()),
        "received": sum(s.received_total for s in stats.values()),
        "sent": sum(s.sent_total for s in stats.values()),
    }
    kept, kept_columns = data.kept_values(node)  # schema evolution: values waiting for their column
    return ctx.render(request, "store.html", summary={**summary, "kept": kept, "kept_columns": kept_columns},
                      base_url="/", set_aside=data.set_aside_docs(node),
                      problems=data.problems(node, stats.values()), **_tab_data(ctx, tab, None))


def _ho_page(request: Request, ctx: UiContext) -> Response:
    now = datetime.now(UTC)
    rows = data.store_rows(ctx.node, ctx.settings.silent_after_minutes, now)
    totals = data.totals(rows)
    problems = data.problems(ctx.node, [r.stats for r in rows])
    if request.query_params.get("tab") == "checks":
        return ctx.render(request, "ho.html", totals=totals, problems=problems, **_tab_data(ctx, "checks", None))
    only = request.query_params.get("only") == "attention"
    if only:
        rows = [r for r in rows if r.attention]
    rows, col, desc = data.sort_rows(rows, request.query_params.get("sort", "attention"), now)

    def sort_link(name: str) -> str:
        target = f"-{name}" if col == name and not desc else name
        params = {"sort": target, **({"only": "attention"} if only else {})}
        return "/?" + urlencode(params)

    parked, parked_total = data.parked_docs(ctx.node, limit=100)
    return ctx.render(request, "ho.html", rows=rows, totals=totals, sort_col=col, sort_desc=desc,
                      sort_link=sort_link, only=only, now=now, tab="stores", problems=problems,
                      silent_after=ctx.settings.silent_after_minutes, parked=parked,
                      parked_total=parked_total, quarantine=data.quarantined(ctx.node),
                      set_aside=data.set_aside_docs(ctx.node))


def peer_page(request: Request) -> Response:
    ctx = _ctx(request)
    peer = request.path_params["peer"]
    if peer not in ctx.node.cfg.peers:
        return ctx.render_plain(request, "error.html", 404, title="Unknown peer",
                          message=f"{peer} is not a peer of {ctx.node.id}.")
    tab = request.query_params.get("tab", "received")
    if tab == "checks":
        tab = "received"
    stats = data.peer_stats(ctx.node).get(peer) or data.PeerStats(peer)
    now = datetime.now(UTC)
    row = next((r for r in data.store_rows(ctx.node, ctx.settings.silent_after_minutes, now)
                if r.id == peer), None)
    return ctx.render(request, "peer.html", peer=peer, stats=stats, row=row, now=now,
                      base_url=f"/peer/{quote(peer)}", **_tab_data(ctx, tab, peer))


async def _post_form(request: Request) -> dict[str, str] | Response:
    """The urlencoded form of a POST, or a 403 when its CSRF token is missing or wrong."""
    ctx = _ctx(request)
    body = (await request.body()).decode("utf-8", "replace")
    form = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
    if not ctx.guard.csrf_ok(form.get("csrf"), ctx.session(request)):
        return ctx.render_plain(request, "error.html", 403, title="Forbidden",
                                message="The form's security token is missing or out of date. "
                                        "Reload the page and press the button again.")
    return form


async def action(request: Request) -> Response:
    form = await _post_form(request)
    if isinstance(form, Response):
        return form
    ctx = _ctx(request)
    what = request.url.path.strip("/")
    peer = form.get("peer") or None
    if what == "retry" and peer is not None and peer not in ctx.node.cfg.peers:
        return ctx.render_plain(request, "error.html", 404, title="Unknown peer",
                                message=f"{peer} is not a peer of {ctx.node.id}.")
    if what == "sync":
        result = await run_in_threadpool(ctx.jobs.start_sync)
    else:
        result = await run_in_threadpool(ctx.jobs.start_retry, peer)
    return RedirectResponse(_with_notice(_safe_next(form.get("next")), result), status_code=303)


def conflicts_page(request: Request) -> Response:
    """Concurrent changes of documents edited on both sides: the held ones with both versions and buttons."""
    from exchange.database.conflicts import conflict, conflicts

    ctx = _ctx(request)
    with ctx.node.engine.connect() as conn:
        found = [conflict(conn, c.id) for c in conflicts(conn, limit=200)]
    items = []
    for c in found:
        if c is None:
            continue
        item = c.as_json(with_rows=True)  # times as datetimes: the page shows them in the viewer's zone
        item["detected_at"] = c.detected_at
        item["ours"]["changed_at"], item["theirs"]["changed_at"] = c.our_at, c.their_at
        items.append(item)
    return ctx.render(request, "conflicts.html", conflicts=items,
                      held=sum(1 for c in items if c["status"] == "OPEN"))


async def resolve_conflict(request: Request) -> Response:
    """Keep ours or theirs for one OPEN conflict (exchange.receive.conflicts.resolve); the next sync sends it."""
    from exchange.errors import ConflictError
    from exchange.receive.conflicts import resolve

    form = await _post_form(request)
    if isinstance(form, Response):
        return form
    ctx = _ctx(request)
    keep, number = form.get("keep"), form.get("id", "")
    if keep not in ("ours", "theirs") or not number.isdigit():
        return ctx.render_plain(request, "error.html", 400, title="Bad request",
                                message="Choose a conflict and whose version to keep.")
    try:
        await run_in_threadpool(resolve, ctx.node, int(number), "ours" if keep == "ours" else "theirs",
                                form.get("by") or "page")
    except ConflictError as exc:
        return ctx.render_plain(request, "error.html", 409, title="Not resolved", message=exc.message)
    return RedirectResponse("/conflicts?notice=resolved", status_code=303)


def api_status(request: Request) -> Response:
    ctx = _ctx(request)
    job = ctx.jobs.current()
    finished = job.finished if job is not None else None  # read before the last sync, as in render()
    last_time, last_result, last_ok = ctx.jobs.last_sync()
    task, done, total = ctx.jobs.activity.progress()
    return JSONResponse({
        "node": ctx.node.id, "role": ctx.node.cfg.role, "version": __version__,
        "job": None if job is None else {
            "kind": job.kind, "running": finished is None, "started": job.started, "finished": finished,
            "result": job.result, "ok": job.ok,
            "activity": [line.text for line in ctx.jobs.activity.since(job.started)],
            "task": task, "done": done, "total": total},
        "last_sync": {"time": last_time, "result": last_result, "ok": last_ok},
    })


def metrics(request: Request) -> Response:
    from exchange.service.metrics import CONTENT_TYPE, render

    return Response(render(_ctx(request).registry), media_type=CONTENT_TYPE)


async def login(request: Request) -> Response:
    """Sign in with the token POSTed from the form (never in the address: it would stay in the
    browser's history and in proxies' logs). A GET shows the form."""
    ctx = _ctx(request)
    if request.method == "POST":
        body = (await request.body()).decode("utf-8", "replace")
        form = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
        given, nxt = form.get("token"), _safe_next(form.get("next"))
    else:
        given, nxt = None, _safe_next(request.query_params.get("next"))
    if not ctx.settings.token:
        return RedirectResponse(nxt, status_code=303)
    if given is None:
        return ctx.render_plain(request, "login.html", 401, failed=False, next=nxt,
                                in_address="token" in request.query_params)
    if not ctx.guard.token_ok(given):
        return ctx.render_plain(request, "login.html", 401, failed=True, next=nxt)
    resp = RedirectResponse(nxt, status_code=303)
    resp.set_cookie(COOKIE, ctx.guard.session_value(), httponly=True, samesite="strict",
                    secure=request.url.scheme == "https", path="/")
    return resp


def create_app(node: Node, settings: UiSettings | None = None, service: Service | None = None) -> Starlette:
    """The page's ASGI app for ``node`` (inside ``exchange run`` when ``service`` is given)."""
    settings = settings or UiSettings.for_node(node)
    app = Starlette(routes=[
        Route("/", home),
        Route("/peer/{peer}", peer_page),
        Route("/sync", action, methods=["POST"]),
        Route("/retry", action, methods=["POST"]),
        Route("/conflicts", conflicts_page),
        Route("/conflicts/resolve", resolve_conflict, methods=["POST"]),
        Route("/api/status", api_status),
        Route("/metrics", metrics),
        Route("/login", login, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ], middleware=[Middleware(AccessMiddleware)])
    app.state.ui = UiContext(node, settings, service)
    return app


# ---------------------------------------------------------------- serving

def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"cannot serve the Data Exchange page on {host}:{port}: {exc.strerror or exc}",
                          hint="Choose another port ([ui] port or --ui-port/--port).") from exc
    sock.set_inheritable(True)
    return sock


def _server(app: Starlette) -> uvicorn.Server:
    import uvicorn

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class UiServer:
    """The page served by uvicorn in a background thread (the service add-on, tests)."""

    def __init__(self, app: Starlette, settings: UiSettings) -> None:
        check_bind(settings.host, settings.token)
        self.app = app
        self.settings = settings
        self._sock = _listen(settings.host, settings.port)
        self.url = _url(self._sock)
        self._server = _server(app)
        self._thread: threading.Thread | None = None

    @property
    def context(self) -> UiContext:
        ctx: UiContext = self.app.state.ui
        return ctx

    def start(self, timeout: float = 10.0) -> None:
        def run() -> None:
            try:
                asyncio.run(self._server.serve(sockets=[self._sock]))
            except Exception:
                log.exception("the Data Exchange page stopped unexpectedly")

        self._thread = threading.Thread(target=run, name="exchange-ui", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.02)
        if not self._server.started:
            raise ConfigError(f"the Data Exchange page did not start on {self.url}")
        log.info("Data Exchange page on %s", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self._sock.close()
        except OSError:
            pass


class UiAddon:
    """The page beside ``exchange run``: its Sync button asks the service for a cycle."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, token: str | None = None,
                 silent_after_minutes: float | None = None) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.silent_after_minutes = silent_after_minutes
        self.server: UiServer | None = None

    def start(self, service: Service) -> None:
        from exchange.service.ui.jobs import TeeReporter

        settings = UiSettings.for_node(service.node, host=self.host, port=self.port, token=self.token,
                                       silent_after_minutes=self.silent_after_minutes)
        app = create_app(service.node, settings, service)
        ctx: UiContext = app.state.ui
        # the service's own cycles and imports feed the page's activity list too
        service.reporter = TeeReporter(ctx.jobs.activity, service.reporter)
        self.server = UiServer(app, settings)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def url(self) -> str | None:
        return self.server.url if self.server else None


def serve(node: Node, *, host: str | None = None, port: int | None = None,
          echo: Any = print) -> None:
    """Serve the page alone in this thread until Ctrl-C / SIGTERM (``exchange ui``)."""
    settings = UiSettings.for_node(node, host=host, port=port)
    check_bind(settings.host, settings.token)
    app = create_app(node, settings)
    sock = _listen(settings.host, settings.port)
    url = _url(sock)
    echo(f"Data Exchange page for {node.id} ({node.cfg.role}) on {url}")
    if settings.token:
        echo(f"open {url} and sign in with the configured token")
    server = _server(app)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
