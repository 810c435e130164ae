"""The house rules, checked on the import graph (drawn from the source with `ast`): imports point down the
layers, steps never import steps, nothing below the providers imports them, and each provider package imports
no other provider. `python -m tests.test_architecture` prints the graph."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "finetune_mlflow"

# Lower number = lower floor. A module may import its own floor or below.
LAYERS = {
    0: {"errors", "liveness", "prompt", "costing", "squad_metrics", "stats", "records", "cleaning", "config",
        "run_names", "redaction", "request_limits", "store_outage", "lifecycle_entries"},
    1: {"providers"},
    2: {"evaluation", "tracking", "progress", "summary", "scorefile", "registry", "qa_model", "served", "serving",
        "preparation", "scoring", "job_tracking", "promotion", "sweep_plan", "traces", "report", "checkpoints",
        "run_cost", "model_code", "scratch", "ownership",
        "process", "promotion_lock", "promotion_notes", "sweep_children", "store_check",
        "lifecycle_facts", "lifecycle_record", "lifecycle_table", "promotion_lifecycle", "migration_plan",
        "migration_rule", "migration_report", "agreement"},
    3: {"steps", "search"},  # search: the tune step's pruning hook below, promote of the chosen trial above
    4: {"pipeline", "sweep", "migration", "cli", "__main__", "__init__"},
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every finetune_mlflow module a file imports (top level, inside functions, or under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune_mlflow"):
            if node.module != "finetune_mlflow":  # `from finetune_mlflow import cleaning` imports cleaning only
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("finetune_mlflow"))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next(level for level, names in LAYERS.items() if top in names)


def test_every_module_has_a_floor():
    for module in graph():
        floor(module)


def test_imports_point_down_the_layers():
    upward = [(m, t) for m, targets in graph().items() for t in targets if floor(t) > floor(m)]
    assert upward == []


def test_steps_do_not_import_steps():
    crossing = [(m, t) for m, targets in graph().items() for t in targets
                if m.startswith("finetune_mlflow.steps.") and t.startswith("finetune_mlflow.steps.")]
    assert crossing == []


def test_provider_packages_stay_in_their_room():
    """A provider imports the shared floor and providers.base/retry/job_dir, never another provider."""
    for module, targets in graph().items():
        parts = module.split(".")
        if len(parts) > 2 and parts[1] == "providers" and parts[2] not in ("base", "retry", "job_dir"):
            others = {t for t in targets if t.startswith("finetune_mlflow.providers.")
                      and t.split(".")[2] not in (parts[2], "base", "retry", "job_dir")}
            assert others == set(), module


if __name__ == "__main__":
    for module, targets in graph().items():
        print(module, "->", ", ".join(sorted(t.removeprefix("finetune_mlflow.") for t in targets)) or "-")
