"""The exception tree: every ExchangeError subclass of the package is in errors.py's tree, and the
code decides by class, never by matching an error's message text."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import exchange
from exchange import errors
from exchange.errors import ExchangeError


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def test_every_exception_class_is_in_the_tree() -> None:
    for mod in pkgutil.walk_packages(exchange.__path__, "exchange."):
        if not mod.name.endswith(".__main__"):  # runs the CLI
            importlib.import_module(mod.name)
    tree = errors.__doc__ or ""
    found = {c for c in _all_subclasses(ExchangeError) if c.__module__.startswith("exchange.")}
    assert len(found) > 15  # every module was imported
    missing = sorted(c.__name__ for c in found if not re.search(rf"\b{c.__name__} \({c.exit_code}\)", tree))
    assert missing == [], f"add these to the tree in exchange/errors.py's docstring: {missing}"


#: Comparing an error's text with a word: ``"..." in str(exc)``, ``"..." in exc.message``, ``str(exc).startswith``.
TEXT_MATCH = re.compile(r"""["'][^"']*["']\s+in\s+(str\(\w+\)|\w+\.message)|str\(\w+\)\.(startswith|endswith)""")

#: (file, what is matched): third-party errors that carry their meaning only in their text (no class to
#: tell them apart), and formatting that decides nothing. No decision about an error of ours belongs here.
ALLOWED = {
    ("exchange/database/catalog.py", "Could not reflect"),  # SQLAlchemy: InvalidRequestError for a missing table
    ("exchange/wire/signed.py", "{path.name}:"),  # wrap: a message names its file once, not twice
}


def test_no_decision_by_an_error_message_of_ours() -> None:
    root = Path(exchange.__file__).parent
    hits = set()
    for path in sorted(root.rglob("*.py")):
        for line in path.read_text().splitlines():
            m = TEXT_MATCH.search(line)
            if m:
                rel = path.relative_to(root.parent).as_posix()
                hits.add((rel, line.strip()))
    unexpected = [(f, line) for f, line in hits if not any(f == tf and w in line for tf, w in ALLOWED)]
    assert unexpected == []
    stale = [(tf, w) for tf, w in ALLOWED if not any(f == tf and w in line for f, line in hits)]
    assert stale == [], "no longer matched: remove from ALLOWED"
