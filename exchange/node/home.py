"""A node: its configuration, keys, trust store and database, opened together.

Creating a home (``init_home``) and opening one (``Node.open``) live here so
every command and the service see a node the same way.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exchange.database.direct import plain_file
from exchange.errors import ConfigError, DatabaseError
from exchange.node import config, keys, perms
from exchange.node.config import NodeConfig, Role

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from exchange.database.catalog import Catalog
    from exchange.wire.crypto.sshsig import AllowedSigners


def init_home(home: Path, node_id: str, role: Role, database: str | None = None) -> NodeConfig:
    """Create a node home: folders, exchange.toml, keys, trust store, database.

    Private whatever the umask: the home folder 0700, every file in it 0600.
    """
    from exchange.database.tables import check_reachable, normalize_url

    home = Path(home).expanduser().resolve()
    if (home / config.CONFIG_NAME).exists():
        raise ConfigError(f"{home} is already a node home", hint="Use a new folder, or keep this one.")
    config.entered_node_id(node_id)
    if database:  # a server database must exist and answer before anything is made: no half-made home
        database = normalize_url(database)
        check_reachable(database)
    cfg = NodeConfig(home=home, id=node_id, role=role,
                     database=database or config.default_database(home))
    perms.make_private_dir(home)
    for folder in cfg.folders():
        perms.make_private_dirs(home, folder)
    keys.generate(cfg)
    cfg.save()
    db_file = sqlite_file(cfg.database)
    if db_file is not None and not db_file.exists():
        perms.create_private(db_file)  # SQLite gives its -wal and -journal files the same mode
    from sqlalchemy.exc import SQLAlchemyError

    try:
        Node(cfg).migrate()
    except (DatabaseError, SQLAlchemyError) as exc:
        text = exc.message if isinstance(exc, DatabaseError) else str(exc).splitlines()[0]
        raise DatabaseError(f"{text}; the home {home} was made without its tables",
                            hint=f"Fix the cause, then run `exchange migrate --home {home}`: it creates the "
                                 "tables and the home is complete.") from exc
    return cfg


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for an in-memory or server database)."""
    plain = plain_file(url)
    if plain is not None:
        return Path(plain)  # what make_url gives, without importing SQLAlchemy (exchange doctor)
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if not u.drivername.startswith("sqlite") or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


class Node:
    """An opened node home; heavy parts (database, keys) load on first use."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg

    @classmethod
    def open(cls, home: str | Path | None, *, check_modes: bool = True) -> Node:
        return cls(config.load(home, check_modes=check_modes))

    @property
    def id(self) -> str:
        return self.cfg.id

    @cached_property
    def engine(self) -> Engine:
        from exchange.database.tables import make_engine

        return make_engine(self.cfg.database)

    def migrate(self) -> int:
        from exchange.database.schema import RETAIL, add_missing_columns
        from exchange.database.tables import migrate

        steps = migrate(self.engine)
        if not self.cfg.catalog or self.cfg.catalog.get("schema", "reference") == "reference":
            RETAIL.create_all(self.engine)
            from exchange.database.schema import upgrade_reference

            with self.engine.begin() as conn:  # zone-aware bill times (docs/CATALOG.md, "Business times")
                steps += len(upgrade_reference(conn))
            with self.engine.begin() as conn:  # columns the reference schema gained since this database was made
                steps += len(add_missing_columns(conn))
            self.__dict__.pop("catalog", None)  # read again: it may have left those columns out
        return steps

    @cached_property
    def catalog(self) -> Catalog:
        from exchange.database.catalog import catalog_from_config

        return catalog_from_config(self.cfg.catalog, reflect_from=self.engine)

    @cached_property
    def signing_key(self) -> Any:
        return keys.load_signing_key(self.cfg)

    @cached_property
    def identities(self) -> list[str]:
        return keys.load_identities(self.cfg)

    @property
    def trust(self) -> AllowedSigners:
        """The trust store as on disk now (re-read each time, parsed once per content: :func:`keys.load_trust`)."""
        return keys.load_trust(self.cfg)

    def recipients_for(self, peer_id: str) -> list[str]:
        """The peer's age recipient plus every auditor this node names."""
        return [self.cfg.peer(peer_id).recipient, *self.cfg.auditors]

    def ensure_folders(self) -> None:
        for folder in self.cfg.folders():
            folder.mkdir(parents=True, exist_ok=True)
