"""The layers of docs/ARCHITECTURE.md, enforced on the imports of exchange/.

Every ``import`` and ``from ... import`` in every module is read with ``ast``
(lazy imports inside functions and ``TYPE_CHECKING`` imports count too: they
are dependencies all the same). Each module belongs to a part: its subpackage
(``wire``, ``send``, ...) or ``base`` for the top-level modules every stage
uses (errors, files, faults, logs, progress, vocabulary). A part may import
only the parts ``ALLOWED`` names; the few documented exceptions are listed in
``EXCEPTIONS`` with their reason, and an exception that no longer occurs must
be removed (here and on the page), so the list never outlives the code.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "exchange"
PAGE = ROOT / "docs" / "ARCHITECTURE.md"

BASE = "base"

#: Which parts each part may import (its own part always). Lower layers first; see the page's "Layers".
ALLOWED: dict[str, set[str]] = {
    BASE: set(),
    "wire": {BASE},
    "database": {BASE},
    "node": {BASE, "wire", "database"},
    "send": {BASE, "wire", "database", "node"},
    "receive": {BASE, "wire", "database", "node"},
    "transport": {BASE, "wire", "node"},
    "audit": {BASE, "wire"},
    "service": {BASE, "wire", "database", "node", "send", "receive", "transport"},
    "demo": {BASE, "wire", "database", "node", "send", "receive", "transport", "service"},
    "cli": {BASE, "wire", "database", "node", "send", "receive", "transport", "service", "audit", "demo"},
}

#: (module, part it imports) -> why it is allowed for now. docs/ARCHITECTURE.md "Exceptions" says the same.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("exchange.transport.usb", "service"):
        "a stick visit is a whole sync cycle through the stick: it runs the service's pull/push and import",
    ("exchange.transport.usb", "send"): "a stick visit exports what is pending before it copies",
    ("exchange.transport.usb", "receive"): "a stick visit imports what it brought",
    ("exchange.wire.crypto.sshsig", "node"):
        "reading an allowed_signers file checks its permissions with node/perms.py",
}

#: Cycles between parts that the exceptions above create, each as the sorted pair of parts.
DOCUMENTED_CYCLES = {("service", "transport"), ("node", "wire")}

#: (module, private name it uses from another part) still to be made public or moved (issue 14).
PRIVATE_USES: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def part_of(module: str) -> str:
    """The part a module belongs to: its subpackage under exchange/, else ``base``."""
    if module == "exchange.__main__":
        return "cli"  # ``python -m exchange``: the command line's other door
    pieces = module.split(".")
    if len(pieces) > 1 and (PACKAGE / pieces[1]).is_dir():
        return pieces[1]
    return BASE


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set[str]:
    """The exchange modules ``module`` imports (``from a import b`` names ``a.b`` when that is a module)."""
    path = MODULES[module]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "exchange")
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if target.split(".")[0] != "exchange":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return out


EDGES: dict[str, set[str]] = {m: imports_of(m) for m in MODULES}


def _cross_part_edges() -> dict[tuple[str, str], set[str]]:
    """(importer's part, imported part) -> the importing modules."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for module, targets in EDGES.items():
        for target in targets:
            a, b = part_of(module), part_of(target)
            if a != b:
                out[(a, b)].add(module)
    return out


def _cycles(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Pairs of parts that reach each other (members of one strongly connected component)."""
    reach = {a: set(bs) for a, bs in graph.items()}
    changed = True
    while changed:
        changed = False
        for a in reach:
            more = set().union(*(reach.get(b, set()) for b in reach[a])) - reach[a]
            if more:
                reach[a] |= more
                changed = True
    return {(min(a, b), max(a, b)) for a in reach for b in reach[a] if a != b and a in reach.get(b, set())}


def test_the_parser_sees_every_kind_of_import() -> None:
    """The walk works: a lazy import in a function, a relative-free ``from`` import of a module, a TYPE_CHECKING one."""
    assert "exchange.service.sync" in EDGES["exchange.cli.main"]  # inside a command function
    assert "exchange.node.keys" in EDGES["exchange.cli.main"]  # ``from exchange.node import keys``
    assert "exchange.database.catalog" in EDGES["exchange.node.home"]  # under TYPE_CHECKING
    assert part_of("exchange.errors") == BASE and part_of("exchange.wire.crypto.age") == "wire"


def test_every_part_has_its_rule() -> None:
    parts = {part_of(m) for m in MODULES}
    assert parts == set(ALLOWED), "a subpackage was added or removed: give it a line in ALLOWED and on the page"


def test_the_declared_layers_have_no_cycle() -> None:
    assert not _cycles(ALLOWED), "ALLOWED itself lets two parts import each other"


def test_imports_follow_the_layers() -> None:
    """Each import stays within what its part may use: receive/ never imports send/ (nor send/ receive/),
    wire/ imports neither side nor the database, nothing outside cli/ imports cli/."""
    bad = []
    for module, targets in sorted(EDGES.items()):
        for target in sorted(targets):
            a, b = part_of(module), part_of(target)
            if a != b and b not in ALLOWED[a] and (module, b) not in EXCEPTIONS:
                bad.append(f"{module} imports {target} ({a}/ may not import {b}/)")
    assert not bad, "layering broken (docs/ARCHITECTURE.md 'Layers'):\n" + "\n".join(bad)


def test_no_exception_outlives_its_reason() -> None:
    stale = [f"{m} -> {p}/" for (m, p) in EXCEPTIONS if not any(part_of(t) == p for t in EDGES.get(m, set()))]
    assert not stale, ("these exceptions no longer occur: remove them from EXCEPTIONS and from "
                       "docs/ARCHITECTURE.md 'Exceptions':\n" + "\n".join(stale))


def test_no_cycles_between_parts_beyond_the_documented_ones() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in _cross_part_edges():
        graph[a].add(b)
    cycles = _cycles(graph)
    assert cycles <= DOCUMENTED_CYCLES, f"new import cycles between parts: {sorted(cycles - DOCUMENTED_CYCLES)}"
    assert cycles == DOCUMENTED_CYCLES, (f"cycles gone: {sorted(DOCUMENTED_CYCLES - cycles)}; remove them from "
                                         "DOCUMENTED_CYCLES and from docs/ARCHITECTURE.md")


def private_uses(module: str, source: str | None = None) -> set[str]:
    """``module.name`` for each private name (``_x``) of another exchange module that ``module`` uses:
    ``from m import _x``, or ``alias._x`` where ``alias`` names an exchange module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source, str(path))
    aliases: dict[str, str] = {}
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if target.split(".")[0] != "exchange":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    aliases[alias.asname or alias.name] = sub
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    out.add(sub)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.add(f"{aliases[node.value.id]}.{node.attr}")
    return out


def test_no_module_uses_another_parts_private_names() -> None:
    """What one part shares with another is public: a private name is used only inside its own part."""
    uses = {(m, name) for m in MODULES for name in private_uses(m)
            if part_of(name.rsplit(".", 1)[0]) != part_of(m)}
    new = sorted(f"{m} uses {name}" for m, name in uses - PRIVATE_USES)
    assert not new, "make these public (or move them) instead:\n" + "\n".join(new)
    gone = sorted(f"{m} uses {name}" for m, name in PRIVATE_USES - uses)
    assert not gone, "no longer used: remove from PRIVATE_USES:\n" + "\n".join(gone)


def test_the_private_name_check_sees_both_forms() -> None:
    """The check reads ``from m import _x`` and ``alias._x``, and leaves public and dunder names alone."""
    source = ("from exchange.wire.bundle import _wrap, seal_bundle\n"
              "from exchange.database import rows\n"
              "from exchange import wire\n"
              "rows._typed_key(1); rows.canonical_key(2); rows.__name__; wire.__doc__\n")
    assert private_uses("exchange.service.sync", source) == {"exchange.wire.bundle._wrap",
                                                             "exchange.database.rows._typed_key"}


def _page_name(module: str) -> str:
    """How the page names a module: its path under exchange/ (``wire/bundle.py``; a package as ``wire/``)."""
    rel = MODULES[module].relative_to(PACKAGE)
    return f"{rel.parent.as_posix()}/" if rel.name == "__init__.py" else rel.as_posix()


def test_the_page_names_every_module_and_exception() -> None:
    """docs/ARCHITECTURE.md maps every module: a new module gets its line there."""
    page = PAGE.read_text(encoding="utf-8")
    missing = [_page_name(m) for m in MODULES if m not in ("exchange", "exchange.__main__")
               and f"`{_page_name(m)}`" not in page]
    assert not missing, "modules docs/ARCHITECTURE.md does not name: " + ", ".join(missing)
    for module, part in EXCEPTIONS:
        assert f"`{_page_name(module)}`" in page, f"the exception {module} -> {part}/ is not on the page"
