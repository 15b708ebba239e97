"""`exchange init --database URL`: the URL forms people paste, and no half-made home.

A node on PostgreSQL is made with ``exchange init --database URL`` against a
database that exists; init creates exchange's and the business tables there.
``postgres://`` and ``postgresql://`` (what libpq and hosting panels print) work
like ``postgresql+psycopg://``; a database that does not exist, or a server
that does not answer, stops init before anything is written, with the fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect

from exchange.cli import main
from exchange.database.tables import make_engine
from exchange.node import config


def _init(home: Path, url: str) -> object:
    return CliRunner().invoke(main, ["init", "--home", str(home), "--node", "ho", "--role", "ho",
                                     "--database", url])


@pytest.mark.parametrize("scheme", ["postgres://", "postgresql://", "postgresql+psycopg://"])
def test_init_on_postgresql_accepts_the_usual_url_forms(tmp_path: Path, pg_url: str, scheme: str) -> None:
    url = scheme + pg_url.split("://", 1)[1]
    res = _init(tmp_path / "ho", url)
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    saved = config.load(tmp_path / "ho").database
    assert saved.startswith("postgresql+psycopg://")
    engine = make_engine(saved)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"xchg_event", "xchg_doc_version", "item", "sales_bill_line"} <= tables


def test_init_against_a_missing_database_makes_nothing(tmp_path: Path, pg_url: str) -> None:
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_db_" + tmp_path.name[-8:].replace("-", "_") + \
        "?" + pg_url.split("?", 1)[1]
    home = tmp_path / "ho"
    res = _init(home, missing)
    assert res.exit_code == 40, res.output  # type: ignore[attr-defined]
    out = res.output  # type: ignore[attr-defined]
    assert "does not exist" in out and "createdb no_such_db_" in out
    assert not home.exists(), "no half-made home"
    assert _init(home, pg_url).exit_code == 0  # once it exists, the same command works


def test_a_server_that_does_not_answer_makes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "ho"
    res = _init(home, "postgres://nobody@127.0.0.1:1/x?connect_timeout=3")
    assert res.exit_code == 40, res.output  # type: ignore[attr-defined]
    assert "cannot connect" in res.output and "server runs" in res.output  # type: ignore[attr-defined]
    assert not home.exists()
