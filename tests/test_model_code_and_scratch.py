"""What a registered model ships (only the modules serving imports) and scratch folders that outlive no process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from finetune_mlflow.model_code import PACKAGE_DIR, imported_names, required_files, stage_package
from tests.conftest import ROOT


def test_serving_ships_every_provider_and_nothing_the_steps_need():
    shipped = {str(p.relative_to(PACKAGE_DIR)) for p in required_files(PACKAGE_DIR / "serving.py")}
    # Providers are found by name in a string table: each must travel, with the packages' __init__ files.
    assert {"__init__.py", "qa_model.py", "config.py", "providers/__init__.py", "providers/local/provider.py",
            "providers/openai/provider.py", "providers/vertex/provider.py", "providers/transformers/provider.py",
            "providers/local/span_model.py"} <= shipped
    assert not [p for p in shipped if p.startswith("steps/") or p in ("cli.py", "registry.py", "tracking.py")]


def test_imports_inside_functions_and_module_names_in_strings_count():
    source = ("import os\nfrom finetune_mlflow.providers.local import span_model\n"
              "def f():\n    from finetune_mlflow.providers.base import JobState\n"
              "TABLE = {'x': 'finetune_mlflow.providers.local:LocalProvider'}\n")
    assert imported_names(source) == {"finetune_mlflow.providers.local", "finetune_mlflow.providers.local.span_model",
                                      "finetune_mlflow.providers.base", "finetune_mlflow.providers.base.JobState"}


def test_the_staged_package_serves_on_its_own(tmp_path):
    """The staged copy, alone on the path (no checkout, no installed package), imports the serving model."""
    package = stage_package(PACKAGE_DIR / "serving.py", tmp_path / "code")
    assert package == tmp_path / "code" / "finetune_mlflow" and (package / "qa_model.py").is_file()
    probe = ("import sys; sys.path = [p for p in sys.path if 'finetune' not in p and p not in ('', '.')]; "
             f"sys.path.insert(0, {str(tmp_path / 'code')!r}); import finetune_mlflow.qa_model as m; "
             "import finetune_mlflow.providers.local; print(m.__file__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(package / "qa_model.py")


def test_scratch_folders_are_removed_when_the_process_exits(tmp_path):
    probe = ("from finetune_mlflow.scratch import scratch_dir; d = scratch_dir('probe'); "
             "(d / 'f.txt').write_text('x'); print(d)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    left = [p.name for p in tmp_path.iterdir() if p.name != "mlflow.db"]  # the test's own tracking store
    assert Path(done.stdout.strip()).parent == tmp_path and left == []


def test_requirements_are_the_declared_dependencies_pinned_without_the_package_itself():
    import importlib.metadata

    from finetune_mlflow.model_code import serving_requirements

    pinned = serving_requirements()
    assert f"mlflow=={importlib.metadata.version('mlflow')}" in pinned
    assert not [r for r in pinned if r.startswith(("finetune-mlflow", "pytest", "moto", "boto3", "psycopg2"))]
    assert serving_requirements("no-such-distribution") is None  # not installed: MLflow infers, as before
