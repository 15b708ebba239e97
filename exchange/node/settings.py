"""Every setting ``exchange.toml`` may hold, declared once: its type, default, unit and help.

The commented file ``exchange init`` writes (:func:`template`) and the check
at every load (:func:`check`) both read this table, so a setting cannot be
documented without being accepted, or accepted without being documented.
Durations are in seconds; a name that ends in ``_minutes`` or ``_days``
says its unit. A new setting is a new row here (tests/test_config_file.py
compares the table with the template and with the modules that read it).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exchange.errors import ConfigError

#: What a value must be: "int", "number" (int or float), "str", "strs" (a list of strings),
#: "str-or-strs", "table", "str-or-table", "tables" (an array of tables), "bool".
Kind = str


@dataclass(frozen=True)
class Setting:
    key: str
    kind: Kind
    default: Any  # None: unset unless the operator sets it
    help: str
    example: Any = None  # shown, commented out, for a setting without a default
    minimum: int | None = None  # for "int": the smallest value accepted
    older: bool = False  # an older spelling still read: the template names it in a comment only


@dataclass(frozen=True)
class Section:
    name: str
    help: str
    settings: tuple[Setting, ...]
    #: checked in depth elsewhere (the catalog: exchange/database/catalog.py); here only its keys' types
    detail: str = ""

    def get(self, key: str) -> Setting | None:
        return next((s for s in self.settings if s.key == key), None)


NODE = Section("node", "This node: who it is, its database, its schedule.", (
    Setting("id", "str", None, "this node's id (1-32 of a-z, 0-9 and '-'), named in every file it signs; "
            "set by `exchange init`"),
    Setting("role", "str", None, "\"ho\" (head office) or \"store\"; set by `exchange init`"),
    Setting("database", "str", None, "SQLAlchemy URL of the node database "
            "(default: sqlite:///<home>/exchange.db)"),
    Setting("sync_interval", "int", 900, "seconds between two sync cycles of `exchange run`", minimum=1),
    Setting("resend_after", "int", 3600, "seconds without an ack before a sent bundle is sent again",
            minimum=1),
    Setting("parked_retry_interval", "int", 300, "seconds between the service's retries of parked "
            "documents (0: off)", minimum=0),
    Setting("max_bundle_rows", "int", 20_000, "rows at most in one bundle (more make several bundles)",
            minimum=1),
    Setting("max_clock_skew", "int", 300, "seconds a peer's signed times may be off ours before it is "
            "reported", minimum=0),
    Setting("auditors", "strs", [], "age recipients (age1...) every bundle is also encrypted to "
            "(docs/AUDIT.md)"),
))

PEER = Section("peers.<id>", "One table per peer, written by `exchange peer add` (edit with the `peer` "
               "commands, not by hand: its keys live in keys/allowed_signers).", (
    Setting("role", "str", None, "\"ho\" or \"store\""),
    Setting("recipient", "str", None, "the peer's age recipient (age1...): bundles to it are encrypted to it"),
    Setting("transport", "str", None, "how its files travel: sftp://user@host:port/root or dir:/path "
            "(unset: by USB stick, docs/USB.md)"),
    Setting("groups", "strs", [], "HO: the groups this store belongs to (documents routed by group)"),
    Setting("state", "str", "active", "\"active\", \"paused\" or \"removed\" (`exchange peer pause`, "
            "`peer resume`, `peer remove`)"),
    Setting("state_since", "str", None, "when the state was set (RFC 3339, UTC)"),
    Setting("state_reason", "str", None, "why the state was set (as given to the command)"),
))

UI = Section("ui", "The web page (docs/UI.md).", (
    Setting("port", "int", None, "port of the page while `exchange run` runs (unset: no page); "
            "`exchange ui` uses 8765", example=8765, minimum=1),
    Setting("host", "str", "127.0.0.1", "address the page listens on; anything but a loopback address "
            "needs a token"),
    Setting("token", "str", None, "the sign-in token (or EXCHANGE_UI_TOKEN); required off loopback",
            example="change-me"),
    Setting("silent_after", "int", 3600, "HO: seconds without any contact before a store is marked "
            "silent", minimum=1),
    Setting("silent_after_minutes", "number", None, "the same in minutes (older spelling, still read; "
            "prefer silent_after in seconds)", older=True),
))

USB = Section("usb", "USB sticks (docs/USB.md).", (
    Setting("roots", "strs", None, "folders sticks are mounted under, each looked at 0-2 levels down "
            "(unset: /media, /run/media, /mnt; macOS /Volumes)", example=["/media", "/run/media", "/mnt"]),
))

HEALTH = Section("health", "Heartbeats (docs/SERVICE.md).", (
    Setting("heartbeat_every", "int", 60, "seconds between heartbeats to a peer (0: every sync)", minimum=0),
))

ALERTS = Section("alerts", "Alerts by command and webhook (docs/ALERTS.md).", (
    Setting("command", "str-or-strs", None, "run once per change, the payload on stdin (split like a "
            "shell would, or a list of arguments)", example="/usr/local/bin/page-oncall --team retail"),
    Setting("webhook", "str", None, "an http(s) URL POSTed once per change (application/json)",
            example="https://chat.example.com/hooks/xchg"),
    Setting("silent_after", "int", None, "seconds without a heartbeat, bundle or ack before a peer is "
            "silent (default: [ui] silent_after, else 3600)", example=3600, minimum=1),
    Setting("silent_after_minutes", "number", None, "the same in minutes (older spelling, still read; "
            "prefer silent_after in seconds)", older=True),
    Setting("key_expiry_days", "number", 14, "days before a trusted signing key's end to warn"),
))

KEYS = Section("keys", "Signing keys (docs/OPERATIONS.md).", (
    Setting("warn_days", "int", 14, "days ahead of a key's end `exchange doctor` warns (0 to 3650)",
            minimum=0),
))

METRICS = Section("metrics", "Prometheus metrics served by `exchange run` without the page (docs/SERVICE.md).", (
    Setting("port", "int", None, "port of /metrics on 127.0.0.1 while `exchange run` runs (unset or 0: off; "
            "1 to 65535)", example=9810, minimum=0),
))

CATALOG = Section("catalog", "The document types exchanged (docs/CATALOG.md).", (
    Setting("schema", "str", "reference", "\"reference\" (the built-in retail tables) or \"database\" "
            "(the tables named by [[catalog.doc]], read from the node database)"),
    Setting("doc", "tables", None, "[[catalog.doc]] tables: one document type each (docs/CATALOG.md)"),
    Setting("conflicts", "table", None, "another conflict policy per document type (docs/CATALOG.md)",
            example={"customer": "ho-wins"}),
    Setting("lanes", "str-or-table", None, "\"reference\" (the reference catalog's lanes) or a lane per "
            "document type; both ends of a stream must agree (docs/CATALOG.md, \"Lanes\")", example="reference"),
), detail="each [[catalog.doc]] is checked when the node opens, by exchange/database/catalog.py")

IMPORT = Section("import", "Applying received bundles (docs/OPERATIONS.md).", (
    Setting("reference_check", "str", "database", "PostgreSQL: who checks that a row's references exist "
            "(a line's item): \"database\" (its foreign-key triggers, row by row) or \"exchange\" (one "
            "query per referenced table, rows locked; faster first loads; needs a superuser or SET on "
            "session_replication_role)"),
))

#: The sections of exchange.toml in the order the template lists them ([peers] last: `peer add` appends).
SECTIONS: tuple[Section, ...] = (NODE, UI, USB, HEALTH, ALERTS, KEYS, METRICS, IMPORT, CATALOG)
PEERS = "peers"

_KINDS: dict[Kind, str] = {
    "int": "a whole number", "number": "a number", "str": "a string in quotes", "strs": "a list of strings",
    "str-or-strs": "a string or a list of strings", "table": "a table", "tables": "an array of tables",
    "str-or-table": "a string or a table",
    "bool": "true or false",
}


def section(name: str) -> Section | None:
    return next((s for s in SECTIONS if s.name == name), None)


def _fits(kind: Kind, value: Any) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "strs":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "str-or-strs":
        return isinstance(value, str) or _fits("strs", value)
    if kind == "table":
        return isinstance(value, Mapping)
    if kind == "str-or-table":
        return isinstance(value, (str, Mapping))
    if kind == "tables":
        return isinstance(value, list) and all(isinstance(v, Mapping) for v in value)
    return isinstance(value, bool)


# ---------------------------------------------------------------- lines, for the messages

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.-]+)\s*=")


def _unquote(part: str) -> str:
    part = part.strip()
    return part[1:-1] if len(part) >= 2 and part[0] == part[-1] and part[0] in "\"'" else part


def _table_path(header: str) -> tuple[str, ...]:
    return tuple(_unquote(p) for p in re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", header))


def line_of(text: str, path: tuple[str, ...]) -> int | None:
    """The 1-based line that defines ``path`` (a table header or a key), if it is written plainly."""
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        m = _HEADER.match(line)
        if m:
            table = _table_path(m.group(1))
            if table == path:
                return number
            continue
        k = _KEY.match(line)
        if k and table + _table_path(k.group(1)) == path:
            return number
    return None


def _where(file: Path, text: str, path: tuple[str, ...]) -> str:
    line = line_of(text, path)
    shown = ".".join(path)
    return f"{file}, line {line} ({shown})" if line else f"{file} ({shown})"


def _nearest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


# ---------------------------------------------------------------- the check

def check(data: Mapping[str, Any], file: Path, text: str) -> None:
    """Refuse an unknown section or key, or a value of the wrong type, naming the line and the nearest key.

    ``data`` is ``text`` parsed (tomllib); what each value means (a role, a
    node id, a catalog entry) is checked by the code that reads it.
    """
    names = [s.name for s in SECTIONS] + [PEERS]
    for name, value in data.items():
        if name == PEERS:
            _check_peers(value, file, text)
            continue
        sec = section(name)
        if sec is None:
            raise ConfigError(f"{_where(file, text, (name,))}: unknown section [{name}]",
                              hint=f"{_nearest(name, names)}Known sections: "
                                   f"{', '.join(f'[{n}]' for n in names)} (see `exchange init --help`).")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(file, text, (name,))}: {name} must be a table [{name}], "
                              f"not {type(value).__name__}", hint=f"Write it as [{name}] with one key per line.")
        _check_table(sec, value, (name,), file, text)


def _check_peers(value: Any, file: Path, text: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_where(file, text, (PEERS,))}: peers must be a table of [peers.<id>] tables",
                          hint="Add peers with `exchange peer add`.")
    for pid, entry in value.items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{_where(file, text, (PEERS, pid))}: peers.{pid} must be a table [peers.{pid}]",
                              hint="Add peers with `exchange peer add`.")
        _check_table(PEER, entry, (PEERS, pid), file, text)


def _check_table(sec: Section, table: Mapping[str, Any], path: tuple[str, ...], file: Path, text: str) -> None:
    known = [s.key for s in sec.settings]
    shown = "[" + ".".join(path) + "]"
    for key, value in table.items():
        setting, at = sec.get(key), path + (key,)
        # (the line is looked up for a message only: a scan of the file per key made opening an HO
        # with 1,000 stores take 10 s of CPU, paid by each fan-in worker; docs/PERFORMANCE.md,
        # "Peak memory and fan-in")
        if setting is None:
            raise ConfigError(f"{_where(file, text, at)}: unknown setting {key!r} in {shown}",
                              hint=f"{_nearest(key, known)}Settings of {shown}: {', '.join(known)}.")
        if not _fits(setting.kind, value):
            raise ConfigError(f"{_where(file, text, at)}: {key} must be {_KINDS[setting.kind]}, not {value!r}",
                              hint=f"{key}: {setting.help}.")
        if setting.minimum is not None and setting.kind == "int" and value < setting.minimum:
            raise ConfigError(f"{_where(file, text, at)}: {key} must be at least {setting.minimum}, not {value!r}",
                              hint=f"{key}: {setting.help}.")
    if "silent_after" in table and "silent_after_minutes" in table:
        raise ConfigError(f"{_where(file, text, path + ('silent_after_minutes',))}: {shown} sets both "
                          "silent_after (seconds) and silent_after_minutes", hint="Keep silent_after only.")


def silent_minutes(table: Any, fallback: float) -> float:
    """A ``[ui]`` or ``[alerts]`` silence threshold in minutes, as the code counts it: ``silent_after``
    (seconds, the preferred spelling), else the older ``silent_after_minutes``, else ``fallback``."""
    if not isinstance(table, Mapping):
        return fallback
    if "silent_after" in table:
        return float(table["silent_after"]) / 60
    return float(table.get("silent_after_minutes", fallback))


# ---------------------------------------------------------------- the commented file `exchange init` writes

def _toml_value(value: Any) -> str:
    import tomlkit

    if isinstance(value, Mapping):
        table = tomlkit.inline_table()
        table.update(value)
        return str(table.as_string())
    return str(tomlkit.item(value).as_string())


def _comment(text: str, width: int = 88) -> list[str]:
    import textwrap

    return ["# " + line for line in textwrap.wrap(text, width - 2)]


def _setting_lines(s: Setting, value: Any, *, off: bool) -> list[str]:
    unit = f" Default: {_toml_value(s.default)}." if s.default not in (None, []) else ""
    if s.older:
        return _comment(f"{s.key}: {s.help}.")
    lines = _comment(s.help[0].upper() + s.help[1:] + "." + unit)
    shown = value if value is not None else s.example if s.example is not None else s.default
    if shown is not None:  # else (an array of tables) the help says how to write it
        lines.append(("# " if off else "") + f"{s.key} = {_toml_value(shown)}")
    return lines


def template(node: Mapping[str, Any]) -> str:
    """``exchange.toml`` as ``exchange init`` writes it: every setting, its unit and default, commented.

    ``node`` holds the [node] values to write (id, role, database and any
    others); every other section is written commented out, ready to be
    switched on by removing the ``#``.
    """
    out = [
        "# exchange.toml: this node's settings. Every setting is listed with its unit and default;",
        "# a line starting with '#' is not in force. Durations are in seconds unless the name says",
        "# otherwise (_minutes, _days). An unknown key or a wrong type is refused when the node opens,",
        "# with its line. The `peer` and `keys` commands edit this file in place and keep your comments.",
        "",
    ]
    for sec in SECTIONS:
        out += _comment(sec.help + (f" Then {sec.detail}." if sec.detail else ""))
        if sec is NODE:
            out.append("[node]")
            for s in sec.settings:
                value = node.get(s.key, s.default)
                out += _setting_lines(s, value, off=value is None)
        else:
            out.append(f"# [{sec.name}]")
            for s in sec.settings:
                out += ["# " + line for line in _setting_lines(s, None, off=False)]
        out.append("")
    out += _comment(PEER.help)
    out.append("# Each [peers.<id>] holds:")
    for s in PEER.settings:
        out += ["#   " + line[2:] for line in _comment(f"{s.key}: {s.help}.", 86)]
    out.append("[peers]")
    return "\n".join(out) + "\n"
