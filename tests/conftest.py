"""Shared pytest fixtures.

``db_url`` runs a test once on SQLite and once on PostgreSQL. PostgreSQL needs
EXCHANGE_TEST_PG, a base URL such as
``postgresql+psycopg://root@/postgres?host=/var/run/postgresql`` (tools/test.sh
sets it); each test gets a throwaway database created from it and dropped
afterwards. Without it the PostgreSQL half is skipped, except under CI=true,
where a silently skipped database would hide failures, so it fails instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text

PG_ENV = "EXCHANGE_TEST_PG"


def _pg_base_url() -> str:
    base = os.environ.get(PG_ENV)
    if not base:
        reason = f"PostgreSQL not configured (set {PG_ENV}; tools/test.sh does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " and CI=true: PostgreSQL tests must run in CI")
        pytest.skip(reason)
    return base


@contextlib.contextmanager
def _fresh_pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database's URL, dropped afterwards."""
    base = make_url(_pg_base_url())
    name = f"xchg_test_{secrets.token_hex(6)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": name})
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database, dropped after the test."""
    with _fresh_pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def pg_url_module() -> Iterator[str]:
    """One fresh PostgreSQL database for a whole module (property tests that keep a net across examples)."""
    with _fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL for a fresh, empty database: SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
    else:
        yield request.getfixturevalue("pg_url")
pytest_plugins = ["sshd"]  # tests/sshd.py: the private OpenSSH server fixtures (sshd, sshd_server)


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Any]:
    """An HO on ``db_url`` and stores s001 (group north) and s002 (south) on SQLite, seeded and in sync
    (``enginehelpers.make_net``). A test file whose tests need another network defines its own ``net``."""
    from enginehelpers import make_net, seed_ho

    n = make_net(tmp_path / "net", ho_db=db_url)
    seed_ho(n)
    n.settle()
    yield n
    n.dispose()


@pytest.fixture(scope="module")
def demo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HO and two stores after a full demo exchange (built once per test module)."""
    from exchange.demo.run import run_demo

    root = tmp_path_factory.mktemp("demo") / "d"
    assert run_demo(root, items=8, sales=3, echo=lambda _s: None)
    return root


@pytest.fixture
def homes(demo_template: Path, tmp_path: Path) -> Path:
    """A private copy of the demo's homes (paths inside exchange.toml are rewritten)."""
    import shutil

    root = tmp_path / "d"
    shutil.copytree(demo_template, root)
    for toml in root.glob("*/exchange.toml"):
        toml.write_text(toml.read_text().replace(str(demo_template), str(root)))
    return root

