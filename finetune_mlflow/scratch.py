"""Scratch folders that live as long as this process: downloaded artifacts and staged files, removed at exit.

The steps hand downloaded data around (a `Prepared` split, a loaded model's weights) until the process ends, so
the folder cannot be a `with` block around one call; registering its removal at exit keeps `/tmp` clean after
every entry point (a process killed with SIGKILL still leaves its folders behind).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import mlflow

PREFIX = "finetune-mlflow-"


def scratch_dir(purpose: str) -> Path:
    """A new empty folder under the system temp dir, removed when this process exits."""
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{purpose}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def download_artifacts(**where: str) -> Path:
    """`mlflow.artifacts.download_artifacts(**where)` into a scratch folder (MLflow's own default is a temp
    folder nobody removes)."""
    return Path(mlflow.artifacts.download_artifacts(**where, dst_path=str(scratch_dir("download"))))
