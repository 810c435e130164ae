"""The package files a registered model needs to be served, staged as a minimal copy of the package for
`code_paths`.

Shipping the whole package folder uploaded every module, test helper and `__pycache__` file with each version
(about 130 objects); serving needs only what `serving.py` imports, directly or through the provider registry.
The set is found by reading imports (and `finetune_mlflow.*` module names in strings, which is how providers are
looked up), so it follows the code as modules move.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
from pathlib import Path

from packaging.requirements import Requirement

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name
DISTRIBUTION = "finetune-mlflow"
MODULE_NAME = re.compile(rf"\b{PACKAGE}(?:\.\w+)*")


def module_file(name: str, root: Path = PACKAGE_DIR.parent) -> Path | None:
    """`finetune_mlflow.providers.local` -> its .py file (or package __init__.py); None if no such module."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(source: str) -> set[str]:
    """Every `finetune_mlflow...` module a file may import: import statements anywhere in it (including inside
    functions) and dotted names in string constants; `from pkg import name` also yields `pkg.name`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.update(MODULE_NAME.findall(node.value))
    return {name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")}


def required_files(entry: Path, root: Path = PACKAGE_DIR.parent) -> set[Path]:
    """The package files reachable from `entry` by imports, with the __init__.py of every package on the way."""
    needed: set[Path] = set()
    pending = [entry]
    while pending:
        path = pending.pop()
        for name in imported_names(path.read_text(encoding="utf-8")):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
                found = module_file(".".join(parts[:depth]), root)
                if found is not None and found not in needed:
                    needed.add(found)
                    pending.append(found)
    return needed


def stage_package(entry: Path, destination: Path, root: Path = PACKAGE_DIR.parent) -> Path:
    """Copy the files `entry` needs into `destination/<package>/...`; returns that package folder."""
    for path in sorted(required_files(entry, root)):
        target = destination / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return destination / PACKAGE


def serving_requirements(distribution: str = DISTRIBUTION) -> list[str] | None:
    """The package's own runtime dependencies, pinned to the installed versions, as the model's pip requirements.

    Without them MLflow infers requirements by loading the model in a child process, most of the time a version
    took to log, and lists this unpublished package itself as a requirement. None when the package is not
    installed (MLflow then infers, as before)."""
    try:
        declared = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    pinned = []
    for requirement in map(Requirement, declared):
        if requirement.marker is None:  # extras (server, test) are not needed to serve
            pinned.append(f"{requirement.name}=={importlib.metadata.version(requirement.name)}")
    return pinned
