"""The command line sits on top: no module of the library imports ``pipeline.cli`` back."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = sorted(p for pkg in ("pipeline", "stages", "indexes") for p in (ROOT / pkg).rglob("*.py")
                 if p != ROOT / "pipeline" / "cli.py")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against the file's package
                pkg = path.relative_to(ROOT).parent.parts
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join([*base, mod] if mod else base)
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_does_not_import_the_cli(path):
    assert "pipeline.cli" not in _imports(path), f"{path.relative_to(ROOT)} imports pipeline.cli"
