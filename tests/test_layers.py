"""The package's layers point one way, read from the imports themselves.

Every module of ``guard`` belongs to a unit with a rank; a module may import its own unit and
units of lower rank only. Offline work (calibration, audit) and serving (service, transports,
the library API) sit side by side and never import each other; nothing imports the CLI.
Imports inside functions and ``TYPE_CHECKING`` blocks count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import guard

PACKAGE = Path(guard.__file__).parent

# unit -> rank. A new module must be placed here, so the rules cannot be skipped by accident.
RANKS = {
    "guard.errors": 0,
    "guard.numbers": 0,
    "guard.demo": 0,
    "guard.algorithm": 1,
    "guard.settings": 2,
    "guard.runtime": 3,
    "guard.preprocess": 4,
    "guard.engine": 4,
    "guard.evidence": 5,
    "guard.datasets": 5,
    "guard.render": 5,
    "guard.verdict": 5,
    "guard.cached_run": 6,
    "guard.gallery": 6,
    "guard.calibration": 7,
    "guard.audit": 7,
    "guard.scaleout": 7,
    "guard.service": 7,
    "guard.api": 8,
    "guard.transport": 9,
    "guard.cli": 10,
    "guard.__main__": 11,
}
OFFLINE = {"guard.cached_run", "guard.calibration", "guard.audit", "guard.scaleout"}
SERVING = {"guard.service", "guard.api", "guard.transport"}


def _unit(module: str) -> str | None:
    """The unit a module name belongs to (longest matching prefix), None outside ``guard``."""
    if module == "guard":
        return "guard"
    matches = [u for u in RANKS if module == u or module.startswith(u + ".")]
    return max(matches, key=len) if matches else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # "from guard import demo" imports the module guard.demo
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "guard" or name.startswith("guard.")}


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "generated" not in p.parts)


def _arrows() -> list[tuple[str, str, str, str]]:
    """(importing module, its unit, imported module, its unit) for every guard import."""
    arrows = []
    for path in _sources():
        module = _module_name(path)
        unit = _unit(module)
        for name in _imports(path):
            target = _unit(name)
            if target is None and name.rsplit(".", 1)[0] != "guard":
                target = _unit(name.rsplit(".", 1)[0])
            if target is not None and unit is not None:
                arrows.append((module, unit, name, target))
    return arrows


def test_every_module_belongs_to_a_ranked_unit() -> None:
    unplaced = [
        _module_name(p)
        for p in _sources()
        if _unit(_module_name(p)) is None and p.name != "__init__.py"
    ]
    assert not unplaced, f"place these modules in RANKS: {unplaced}"


def _upward(arrows: list[tuple[str, str, str, str]]) -> list[str]:
    return [
        f"{module} imports {name}"
        for module, unit, name, target in arrows
        if unit != "guard" and target not in (unit, "guard") and RANKS[target] >= RANKS[unit]
    ]


def test_imports_point_down_the_layers_only() -> None:
    upward = _upward(_arrows())
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_serving_and_offline_code_never_import_each_other() -> None:
    crossing = [
        f"{module} imports {name}"
        for module, unit, name, target in _arrows()
        if (unit in SERVING and target in OFFLINE) or (unit in OFFLINE and target in SERVING)
    ]
    assert not crossing, "\n".join(crossing)


def test_nothing_imports_the_cli() -> None:
    into_cli = [
        f"{module} imports {name}"
        for module, unit, name, target in _arrows()
        if target == "guard.cli" and unit not in ("guard.cli", "guard.__main__")
    ]
    assert not into_cli, "\n".join(into_cli)


def test_the_package_root_imports_nothing_heavy_at_import_time() -> None:
    # guard/__init__.py may only name what it exports lazily; anything it imports eagerly is
    # paid by every "guard --help".
    eager = {
        name
        for name in _imports(PACKAGE / "__init__.py")
        if name not in ("guard",) and not name.startswith("guard.errors")
    }
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    top_level = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not (eager & top_level), f"eager imports in guard/__init__.py: {eager & top_level}"


def test_the_rules_catch_an_upward_import(tmp_path: Path) -> None:
    # The checker itself: an engine module importing the service would be reported.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from guard.service.data_plane import DataPlane\n")
    arrows = [("guard.engine", "guard.engine", name, _unit(name)) for name in _imports(bad)]
    assert "guard.engine imports guard.service.data_plane" in _upward(arrows)
    assert _unit("guard.calibration.fit") == "guard.calibration"
    assert _unit("guard.algorithm.landscape") == "guard.algorithm"
