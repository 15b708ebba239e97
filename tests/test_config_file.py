"""``exchange.toml`` explains itself: the commented template, edits that keep comments, and refusals.

Real node homes made by ``exchange init``, edited by the real ``peer``
commands (click's CliRunner), read back with ``config.load``.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from exchange.cli.main import main
from exchange.errors import ConfigError
from exchange.node import config, settings


def cli(*args: str, code: int = 0) -> Result:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """An HO home and a store home, as `exchange init` makes them."""
    ho, store = tmp_path / "ho", tmp_path / "s001"
    cli("init", "--home", str(ho), "--node", "ho", "--role", "ho")
    cli("init", "--home", str(store), "--node", "s001", "--role", "store")
    return ho, store


def add_store(ho: Path, store: Path, *extra: str) -> None:
    ident = json.loads(cli("identity", "--home", str(store), "--json").output)
    cli("peer", "add", "--home", str(ho), "--peer", ident["id"], "--role", "store",
        "--signing-key", ident["signing_key"], "--recipient", ident["recipient"], *extra)


def write(home: Path, text: str) -> Path:
    path = home / config.CONFIG_NAME
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_peer_add_keeps_the_users_comments_and_order(pair: tuple[Path, Path]) -> None:
    ho, store = pair
    path = ho / config.CONFIG_NAME
    text = path.read_text()
    # the operator's own edits: a comment of theirs, a section switched on, a value changed, keys reordered
    text = text.replace("sync_interval = 900", "sync_interval = 600  # every 10 min: the night shift asked")
    text = text.replace("# [health]\n# # Seconds between heartbeats to a peer (0: every sync). Default: 60.\n"
                        "# heartbeat_every = 60",
                        "[health]\n# ops: a heartbeat every 2 minutes is enough\nheartbeat_every = 120")
    text = "# Managed by the retail ops team; ticket OPS-42.\n" + text
    write(ho, text)
    add_store(ho, store, "--group", "south", "--transport", f"dir:{ho.parent / 'net'}")
    cli("peer", "set-group", "--home", str(ho), "--peer", "s001", "--group", "north")
    cli("peer", "pause", "--home", str(ho), "--peer", "s001", "--reason", "refit")
    after = path.read_text()
    assert after.startswith("# Managed by the retail ops team; ticket OPS-42.\n")
    assert "sync_interval = 600  # every 10 min: the night shift asked\n" in after
    assert "# ops: a heartbeat every 2 minutes is enough\nheartbeat_every = 120\n" in after
    assert "# # Seconds between two" not in after and "# Seconds between two sync cycles" in after
    # everything the user wrote is still there, in the same order, with the peer appended after it
    assert after.index("[node]") < after.index("[health]") < after.index("[peers]") < after.index("[peers.s001]")
    assert after[:after.index("[peers.s001]")].rstrip() == text.rstrip()
    cfg = config.load(ho)
    assert (cfg.sync_interval, cfg.extra["health"]) == (600, {"heartbeat_every": 120})
    peer = cfg.peers["s001"]
    assert (peer.groups, peer.state, peer.state_reason) == (("north",), "paused", "refit")
    cli("peer", "resume", "--home", str(ho), "--peer", "s001")
    resumed = path.read_text()
    assert "state" not in tomllib.loads(resumed)["peers"]["s001"]  # keys of a state gone are removed
    assert resumed[:resumed.index("[peers.s001]")] == after[:after.index("[peers.s001]")]
    cli("peer", "remove", "--home", str(ho), "--peer", "s001", "--reason", "closed for good")
    removed = path.read_text()
    assert removed[:removed.index("[peers.s001]")] == after[:after.index("[peers.s001]")]
    assert config.load(ho).peers["s001"].state == "removed"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_typo_is_refused_naming_the_line_and_the_nearest_key(pair: tuple[Path, Path]) -> None:
    ho, _ = pair
    text = (ho / config.CONFIG_NAME).read_text().replace("sync_interval = 900", "sync_intervall = 900")
    path = write(ho, text)
    line = text.splitlines().index("sync_intervall = 900") + 1
    with pytest.raises(ConfigError) as err:
        config.load(ho)
    assert f"{path}, line {line} (node.sync_intervall)" in err.value.message
    assert "unknown setting 'sync_intervall' in [node]" in err.value.message
    assert "did you mean 'sync_interval'?" in str(err.value.hint)
    out = cli("peer", "list", "--home", str(ho), code=3)  # the CLI says the same, with the config exit code
    assert f"line {line}" in out.output and "sync_interval" in out.output


def test_an_unknown_section_and_a_peer_key_are_refused_with_the_nearest(pair: tuple[Path, Path]) -> None:
    ho, store = pair
    text = (ho / config.CONFIG_NAME).read_text()
    write(ho, text + "\n[alert]\nwebhook = \"https://x.example/h\"\n")
    with pytest.raises(ConfigError) as err:
        config.load(ho)
    assert "unknown section [alert]" in err.value.message and "did you mean 'alerts'?" in str(err.value.hint)
    assert f"line {len(text.splitlines()) + 2} (alert)" in err.value.message
    write(ho, text)
    add_store(ho, store)
    path = ho / config.CONFIG_NAME
    write(ho, path.read_text().replace("groups = ", "group = "))
    with pytest.raises(ConfigError) as err:
        config.load(ho)
    assert "(peers.s001.group)" in err.value.message and "did you mean 'groups'?" in str(err.value.hint)


def test_a_valid_file_is_not_scanned_for_lines(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines are looked up for a message only: one scan of the file per key made opening an HO with
    1,000 stores take 10 s of CPU (every fan-in worker, every command paid it)."""
    ho, store = pair
    add_store(ho, store)
    scans: list[tuple[str, ...]] = []
    real = settings.line_of
    monkeypatch.setattr(settings, "line_of", lambda text, path: scans.append(path) or real(text, path))
    cfg = config.load(ho)
    assert "s001" in cfg.peers and scans == []
    write(ho, (ho / config.CONFIG_NAME).read_text().replace("groups = ", "group = "))
    with pytest.raises(ConfigError, match=r"line \d+ \(peers.s001.group\)"):
        config.load(ho)
    assert scans == [("peers", "s001", "group")]


@pytest.mark.parametrize(("old", "new", "said"), [
    ("sync_interval = 900", 'sync_interval = "15m"', "sync_interval must be a whole number, not '15m'"),
    ("max_bundle_rows = 20000", "max_bundle_rows = 0", "max_bundle_rows must be at least 1, not 0"),
    ("auditors = []", 'auditors = "age1x"', "auditors must be a list of strings, not 'age1x'"),
    ("# [keys]\n# # Days ahead", "[keys]\nwarn_days = true\n# # Days ahead", "warn_days must be a whole number"),
    ("# [ui]\n", "[ui]\nport = \"8765\"\n", "port must be a whole number, not '8765'"),
])
def test_a_wrong_type_is_refused_naming_the_line(pair: tuple[Path, Path], old: str, new: str, said: str) -> None:
    ho, _ = pair
    text = (ho / config.CONFIG_NAME).read_text()
    assert old in text
    text = text.replace(old, new)
    path = write(ho, text)
    key = said.split(" ", 1)[0]
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith(f"{key} ="))
    with pytest.raises(ConfigError) as err:
        config.load(ho)
    assert said in err.value.message
    assert err.value.message.startswith(f"{path}, line {line} (")


def _template_settings(text: str) -> dict[str, set[str]]:
    """Section -> keys the template writes (switched on or commented out)."""
    found: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        bare = line.removeprefix("# ")
        m = re.fullmatch(r"\[([a-z.]+)\]", bare)
        if m:
            section = m.group(1)
            continue
        k = re.match(r"([a-z_]+) = ", bare)
        if k:
            found.setdefault(section, set()).add(k.group(1))
    return found


def test_the_template_documents_every_declared_setting(pair: tuple[Path, Path]) -> None:
    ho, _ = pair
    text = (ho / config.CONFIG_NAME).read_text()
    written = _template_settings(text)
    for sec in settings.SECTIONS:
        declared = {s.key for s in sec.settings if s.kind != "tables" and not s.older}  # the rest: help only
        assert written.get(sec.name) == declared, sec.name
    prose = " ".join(t.lstrip("# ") for t in text.splitlines() if t.startswith("#"))
    for s in settings.NODE.settings + sum((sec.settings for sec in settings.SECTIONS[1:]), ()):
        said = f"{s.key}: {s.help}" if s.older else s.help[0].upper() + s.help[1:]
        assert said in prose, s.key  # its help, with its unit, is written above it
    for s in settings.PEER.settings:
        assert f"#   {s.key}: " in text
    # every commented setting is valid as written: switching all of them on loads
    on = "\n".join(t[2:] if re.match(r"# (\[[a-z]+\]|[a-z_]+ = )", t) else t for t in text.splitlines())
    write(ho, on)
    cfg = config.load(ho)
    assert cfg.extra["health"] == {"heartbeat_every": 60} and cfg.extra["keys"] == {"warn_days": 14}


def test_the_declared_defaults_are_the_ones_the_code_uses() -> None:
    from exchange.node.config import NodeConfig
    from exchange.node.keys import WARN_DAYS
    from exchange.service import alerts, health
    from exchange.service.ui import server

    fresh = NodeConfig(home=Path("/x"), id="ho", role="ho", database="sqlite://")
    for s in settings.NODE.settings:
        if s.default is not None:
            assert getattr(fresh, s.key) == (tuple(s.default) if isinstance(s.default, list) else s.default)
    assert settings.KEYS.get("warn_days") and settings.KEYS.settings[0].default == WARN_DAYS
    assert settings.HEALTH.settings[0].default == health.DEFAULT_EVERY
    alerts_days = settings.ALERTS.get("key_expiry_days")
    assert alerts_days is not None and alerts_days.default == alerts.DEFAULT_KEY_DAYS
    ui_silent = settings.UI.get("silent_after")
    assert ui_silent is not None and ui_silent.default == server.DEFAULT_SILENT_MINUTES * 60
    ui_host = settings.UI.get("host")
    assert ui_host is not None and ui_host.default == "127.0.0.1"
    from exchange.database import references

    check = settings.IMPORT.get("reference_check")
    assert check is not None and check.default == references.DEFAULT


def test_every_section_the_code_reads_is_declared() -> None:
    """A ``cfg.extra.get("x")`` anywhere in exchange/ names a declared section: none escapes the check."""
    root = Path(config.__file__).resolve().parent.parent
    read = set()
    for py in root.rglob("*.py"):
        read |= set(re.findall(r"\.extra\.get\(\"([a-z_]+)\"", py.read_text()))
        read |= set(re.findall(r"\.extra\[\"([a-z_]+)\"\]", py.read_text()))
    assert read, "the pattern no longer finds the readers"
    assert read <= {s.name for s in settings.SECTIONS}, read - {s.name for s in settings.SECTIONS}


def test_silence_is_set_in_seconds_and_the_older_minutes_still_read(pair: tuple[Path, Path]) -> None:
    from exchange.node.home import Node
    from exchange.service import alerts
    from exchange.service.ui.server import UiSettings

    ho, _ = pair
    text = (ho / config.CONFIG_NAME).read_text()

    def opened(extra: str) -> Node:
        write(ho, text + extra)
        return Node.open(ho)

    node = opened("\n[ui]\nsilent_after = 1800\n")
    assert UiSettings.for_node(node).silent_after_minutes == 30
    assert alerts.config(node).silent_after_minutes == 30  # [alerts] says nothing: the page's threshold
    node = opened("\n[ui]\nsilent_after = 1800\n[alerts]\nsilent_after_minutes = 45\n")
    assert (UiSettings.for_node(node).silent_after_minutes, alerts.config(node).silent_after_minutes) == (30, 45)
    node = opened("\n[alerts]\nsilent_after = 600\n")
    assert (UiSettings.for_node(node).silent_after_minutes, alerts.config(node).silent_after_minutes) == (60, 10)
    with pytest.raises(ConfigError, match=r"line \d+ \(ui.silent_after_minutes\): \[ui\] sets both"):
        opened("\n[ui]\nsilent_after = 1800\nsilent_after_minutes = 30\n")


def test_a_short_hand_written_file_stays_short(pair: tuple[Path, Path]) -> None:
    """Settings left at their default are not added by an edit; the user's layout is kept byte for byte."""
    ho, store = pair
    mine = ('# HO of the north region\n[node]\nid = "ho"   # never change\nrole = "ho"\n'
            f'database = "sqlite:///{ho / "exchange.db"}"\nsync_interval = 60\n')
    path = write(ho, mine)
    add_store(ho, store, "--group", "north")
    after = path.read_text()
    assert after.startswith(mine) and "resend_after" not in after and "auditors" not in after
    assert tomllib.loads(after)["peers"]["s001"]["groups"] == ["north"]
    assert config.load(ho).sync_interval == 60


def test_a_save_keeps_what_another_process_changed_meanwhile(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The service holds the config it loaded at start; a `peer pause` run meanwhile is not undone when the
    service later saves a change of its own (here a store moved to another group)."""
    from exchange.node import peers

    ho, store = pair
    other = tmp_path / "s002"
    cli("init", "--home", str(other), "--node", "s002", "--role", "store")
    add_store(ho, store, "--group", "north")
    add_store(ho, other, "--group", "north")
    service_copy = config.load(ho)
    cli("peer", "pause", "--home", str(ho), "--peer", "s001", "--reason", "refit")
    peers.set_groups(service_copy, "s002", ("east",))
    cfg = config.load(ho)
    assert (cfg.peers["s001"].state, cfg.peers["s001"].state_reason) == ("paused", "refit")
    assert cfg.peers["s002"].groups == ("east",)
    cli("peer", "resume", "--home", str(ho), "--peer", "s001")
    peers.set_groups(service_copy, "s002", ("west",))  # its own earlier change is known: only the new one goes
    cfg = config.load(ho)
    assert (cfg.peers["s001"].state, cfg.peers["s002"].groups) == ("active", ("west",))
