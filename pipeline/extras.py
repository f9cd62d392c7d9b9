"""Optional dependencies: check a command's extras before it does any work.

Some commands need packages that a plain ``pip install funnel-rank`` does not bring: the Ray
engine (extra ``ray``), the encoder trainer (``train``: datasets, accelerate), the benchmark's
comparisons (``bench``). A command calls :func:`require_extra` first thing, so a missing package
is one line naming the extra and the command that installs it — before any model is loaded or
any output folder is made, instead of an ``ImportError`` halfway through::

    require_extra("ray", ["ray", "ray.data"], needed_by="--engine ray")
    # funnel: error: --engine ray needs ray.data, which is not installed (extra 'ray'):
    #     pip install -e "/home/me/funnel[ray]"

The install command follows where funnel-rank runs from: in a clone (an editable install) it
names that folder (``.`` from inside it), otherwise the package on PyPI. Modules are looked up with
:func:`importlib.util.find_spec`, so nothing heavy is imported by the check itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

from .errors import MISSING_EXTRA, DependencyError

__all__ = ["require_extra", "missing_modules", "install_command"]

DISTRIBUTION = "funnel-rank"

#: What the ``train`` extra brings that encoder fine-tuning imports (sentence-transformers' trainer).
TRAIN_MODULES = ("datasets", "accelerate")


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported (a dotted name needs its parents)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package is missing or broken
            found = False
        if not found:
            missing.append(name)
    return missing


def install_command(extra: str, distribution: str = DISTRIBUTION) -> str:
    """``pip install`` of ``distribution`` with ``extra``; for funnel-rank, from the clone this code
    runs from (an editable install) when it runs from one, else from PyPI."""
    if distribution != DISTRIBUTION:
        return f'pip install "{distribution}[{extra}]"'
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and f'name = "{DISTRIBUTION}"' in pyproject.read_text(encoding="utf-8", errors="replace"):
        shown = "." if root == Path.cwd().resolve() else str(root)
        return f'pip install -e "{shown}[{extra}]"'
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def require_extra(extra: str, modules: Sequence[str], *, needed_by: str, distribution: str = DISTRIBUTION) -> None:
    """Raise :class:`~pipeline.errors.DependencyError` unless every module of ``modules`` imports.

    ``extra`` is the optional-dependency group of pyproject.toml that provides them and
    ``needed_by`` what needs them (``"--engine ray"``, ``"funnel train encoder"``); both appear
    in the message together with the install command (:func:`install_command`). A plug-in passes
    its own ``distribution`` (its extras are its own).
    """
    missing = missing_modules(modules)
    if missing:
        raise DependencyError(MISSING_EXTRA.format(needed_by=needed_by, modules=", ".join(missing),
                                                   verb="is" if len(missing) == 1 else "are", extra=extra,
                                                   command=install_command(extra, distribution)))
