"""The public API is explicit: every name in ``__all__`` exists and is documented, and the example
plug-in and the stage-writing guide import nothing else from Funnel."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

import pipeline
import pipeline.testing

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "examples" / "plugin"
GUIDE = REPO / "docs" / "writing-a-stage.md"
FUNNEL_PACKAGES = {"pipeline", "stages", "indexes"}
PUBLIC = {"pipeline": pipeline, "pipeline.testing": pipeline.testing}


def funnel_imports(source: str, filename: str = "<source>") -> tuple[list[str], list[str]]:
    """``(public, private)``: every use of a Funnel package in ``source``, as ``file:line: what``.

    Public means ``import pipeline`` / ``import pipeline.testing`` (and attributes of them that
    are in ``__all__``) or ``from pipeline[.testing] import NAME`` with NAME in that module's
    ``__all__``. Anything else from ``pipeline``, ``stages`` or ``indexes`` is private.
    """
    public, private = [], []
    aliases: dict[str, str] = {}
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in FUNNEL_PACKAGES:
                    continue
                (public if alias.name in PUBLIC else private).append(f"{where}: import {alias.name}")
                if alias.name in PUBLIC:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in FUNNEL_PACKAGES:
                continue
            for alias in node.names:
                ok = node.module in PUBLIC and alias.name in PUBLIC[node.module].__all__
                (public if ok else private).append(f"{where}: from {node.module} import {alias.name}")
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases):
            continue
        module, name, shown = aliases[node.value.id], node.attr, node
        if (module, name) == ("pipeline", "testing"):
            parent = parents.get(node)
            if not isinstance(parent, ast.Attribute):
                continue
            module, name, shown = "pipeline.testing", parent.attr, parent
        if name not in PUBLIC[module].__all__:
            private.append(f"{filename}:{node.lineno}: {ast.unparse(shown)}")
    return public, sorted(set(private))


def test_every_public_name_exists_once_and_is_documented():
    names = pipeline.__all__
    assert len(names) == len(set(names)), "duplicates in pipeline.__all__"
    undocumented = [n for n in names if f"``{n}``" not in pipeline.__doc__]
    assert not undocumented, f"pipeline.__all__ names missing from pipeline/__init__.py's docstring: {undocumented}"
    missing = [n for m in PUBLIC.values() for n in m.__all__ if not hasattr(m, n)]
    assert not missing, f"names in __all__ that do not exist: {missing}"


def test_the_checker_tells_private_from_public_imports():
    source = (
        "import pipeline\n"
        "import pipeline.testing as kit\n"
        "import pipeline.stage\n"
        "import stages.rules\n"
        "from pipeline import Stage, StageTags\n"
        "from pipeline import keep_input_types, check_columns\n"
        "from pipeline.schema import ANY\n"
        "from pipeline.testing import StageCase, assert_parity\n"
        "from stages.display import TopNDisplay\n"
        "from indexes import faiss_index\n"
        "from .local import helper\n"
        "import numpy\n"
        "x = pipeline.Stage\n"
        "y = pipeline.registry._LOCAL\n"
        "z = kit.parametrize_with_checks\n"
        "w = pipeline.testing.check_cpu_gpu_parity\n"
    )
    public, private = funnel_imports(source)
    assert {p.split(": ", 1)[1] for p in private} == {
        "import pipeline.stage", "import stages.rules", "from pipeline import check_columns",
        "from pipeline.schema import ANY", "from pipeline.testing import assert_parity",
        "from stages.display import TopNDisplay", "from indexes import faiss_index",
        "pipeline.registry", "pipeline.testing.check_cpu_gpu_parity",
    }
    assert len(public) == 6


def _plugin_sources() -> list[Path]:
    return sorted(p for p in PLUGIN.rglob("*.py") if ".egg-info" not in str(p) and "build" not in p.parts)


def test_the_example_plugin_uses_only_the_public_api():
    sources = _plugin_sources()
    assert any(p.name == "brand_quota.py" for p in sources), f"example plug-in sources not found under {PLUGIN}"
    public, private = [], []
    for path in sources:
        found = funnel_imports(path.read_text(), str(path.relative_to(REPO)))
        public += found[0]
        private += found[1]
    assert not private, "the example plug-in reaches into Funnel's private modules:\n" + "\n".join(private)
    assert any("from pipeline.testing import" in p for p in public) and any("from pipeline import" in p for p in public)


def test_the_guide_uses_only_the_public_api():
    if not GUIDE.exists():
        pytest.skip(f"{GUIDE} is absent")
    blocks = [textwrap.dedent(b) for b in re.findall(r"^ *```python\n(.*?)^ *```", GUIDE.read_text(), flags=re.S | re.M)]
    assert blocks, "the guide has no python examples"
    private = [p for i, block in enumerate(blocks) for p in funnel_imports(block, f"{GUIDE.name} block {i + 1}")[1]]
    assert not private, "docs/writing-a-stage.md imports private names:\n" + "\n".join(private)


def test_the_guides_example_stage_runs_as_shown(capsys):
    if not GUIDE.exists():
        pytest.skip(f"{GUIDE} is absent")
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)
    stage_code, try_it = blocks[0], blocks[1]
    assert "class BrandQuotaFilter(Stage)" in stage_code and len(stage_code.splitlines()) <= 45
    namespace: dict = {}
    with pytest.raises(pipeline.ConfigError, match="the 'per_brand' parameter of stage 'filter.brand_quota' must be"):
        exec(compile(stage_code + try_it, str(GUIDE), "exec"), namespace)  # the guide's own code, not user input
    printed = capsys.readouterr().out
    assert '"a"' in printed and '"c"' in printed and '"b"' not in printed


def test_the_readme_uses_only_the_public_api():
    readme = REPO / "README.md"
    blocks = re.findall(r"^```python\n(.*?)^```", readme.read_text(), flags=re.S | re.M)
    assert blocks, "the README has no python examples"
    private = [p for i, block in enumerate(blocks) for p in funnel_imports(block, f"README.md block {i + 1}")[1]]
    assert not private, "README.md imports private names:\n" + "\n".join(private)
