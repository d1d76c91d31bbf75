"""The layers (docs/architecture.md#layers): no module imports across a layer boundary.

basics (fewstep/errors.py, paths.py, yamlfile.py, __init__) <- kernels <- models <- training, server;
training and server never import each other; clients speak HTTP only and import no other layer.
Only fewstep/cli.py and fewstep/__init__.py (which lazily exposes the SDK) may reach across.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# top-level folder -> the package it installs as (pyproject.toml: [tool.setuptools.package-dir])
PACKAGES = {name: f"fewstep.{name}" for name in ("models", "kernels", "training", "server", "clients")}
PACKAGES["fewstep"] = "fewstep"
OLD_NAMES = set(PACKAGES) - {"fewstep"}

# layer -> the layers its modules may import (a lower layer may be skipped: server uses kernels.runtime)
ALLOWED = {
    "basics": {"basics"},
    "kernels": {"basics", "kernels"},
    "models": {"basics", "kernels", "models"},
    "training": {"basics", "kernels", "models", "training"},
    "server": {"basics", "kernels", "models", "server"},
    "clients": {"basics", "clients"},
}
FREE = {"fewstep", "fewstep.cli"}  # may import any layer


def layer_of(module: str) -> str | None:
    """fewstep.models.flow -> "models"; fewstep, fewstep.errors, fewstep.__version__ -> "basics"; numpy -> None."""
    parts = module.split(".")
    if parts[0] != "fewstep":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in (*ALLOWED, "cli") else "basics"


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """models/flow.py -> ("fewstep.models.flow", False); training/distill/__init__.py -> (..., True)."""
    top, *dirs = path.relative_to(root).with_suffix("").parts
    parts = [PACKAGES[top], *dirs]
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imports(path: Path, root: Path):
    """Yield (line, module as written, absolute target) for every import in the file, nested ones included."""
    name, is_package = module_name(path, root)
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = written = node.module or ""
            if node.level:  # relative: from ..models import ops -> fewstep.models.ops
                anchor = package.rsplit(".", node.level - 1)[0]  # level 1: this package, 2: its parent
                base = f"{anchor}.{base}" if base else anchor
                written = "." * node.level + written
            for alias in node.names:  # `from fewstep import clients` imports the clients layer
                yield node.lineno, written, f"{base}.{alias.name}"


def violations(root: Path) -> list[str]:
    """Every crossed layer and every import of an old top-level name, as 'file:line: what (rule)'."""
    found = []
    for top in sorted(PACKAGES):
        for path in sorted((root / top).rglob("*.py")):
            name, _ = module_name(path, root)
            source = "basics" if top == "fewstep" else top
            where = path.relative_to(root).as_posix()
            for line, written, target in imports(path, root):
                if written.split(".")[0] in OLD_NAMES:
                    found.append(f"{where}:{line}: imports {written!r} (use fewstep.{written})")
                dest = layer_of(target)
                if dest is not None and name not in FREE and dest not in ALLOWED[source]:
                    rule = f"{source} may import only {', '.join(sorted(ALLOWED[source]))}"
                    found.append(f"{where}:{line}: {source} -> {dest} via {target} ({rule})")
    return found


def test_no_layer_is_crossed():
    assert len(list(ROOT.joinpath("models").glob("*.py"))) > 5, "the checker found no model code"
    found = violations(ROOT)
    assert not found, "layer rules broken (docs/architecture.md#layers):\n" + "\n".join(found)


def test_the_checker_flags_crossings(tmp_path):
    for top in PACKAGES:
        (tmp_path / top).mkdir()
    (tmp_path / "server" / "bad.py").write_text("from fewstep.training.loop import train\n")
    (tmp_path / "kernels" / "bad.py").write_text("def f():\n    from ..models import ops\n")
    (tmp_path / "clients" / "bad.py").write_text("import models.flow\nfrom fewstep import server\n")
    (tmp_path / "fewstep" / "cli.py").write_text("from fewstep.training.loop import train\n")  # the CLI may
    found = violations(tmp_path)
    assert [f.split(" (")[0] for f in found] == [
        "clients/bad.py:1: imports 'models.flow'",
        "clients/bad.py:2: clients -> server via fewstep.server",
        "kernels/bad.py:2: kernels -> models via fewstep.models.ops",
        "server/bad.py:1: server -> training via fewstep.training.loop.train",
    ], found
