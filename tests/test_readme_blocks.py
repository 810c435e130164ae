"""The README's marked command blocks, run as written, in order, on a fresh store.

Convention (README.md): a fenced ```bash or ```python block directly preceded by the line
`<!-- readme-test: NAME -->` is a promise that the block runs as written after the marked blocks above it, in the
repository root, with no account, server or network. Blocks that need those are simply not marked.

The blocks run in a copy of the project whose shipped SQuAD files are cut to a few articles (same files, same
paths, real questions), with no `MLFLOW_TRACKING_URI` (MLflow's default `mlflow.db` in the project folder, as a
new user gets) and no experiment chosen by the environment, so each step files its runs where its YAML says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, SQUAD_TRAIN, SQUAD_VALIDATION, squad_subset

MARKER = re.compile(r"^<!-- readme-test: ([\w-]+) -->\n```(bash|python)\n(.*?)^```$", re.M | re.S)
# What a user brings to a block: the README says "your {question id: answer} file" for `score`.
USER_FILES = {"predictions.json"}
PROJECT_FILES = ("MLproject", "conda.yaml", "pyproject.toml", "experiments")


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """(name, language, body) of every marked block, in README order."""
    return [(m.group(1), m.group(2), m.group(3)) for m in MARKER.finditer(text)]


def test_the_marker_finds_only_marked_blocks():
    text = ("intro\n<!-- readme-test: first -->\n```bash\necho one\n```\n\n```bash\necho unmarked\n```\n"
            "<!-- readme-test: second -->\n```python\nprint(2)\n```\n<!-- readme-test: spaced -->\n\n```bash\nx\n```\n")
    assert readme_blocks(text) == [("first", "bash", "echo one\n"), ("second", "python", "print(2)\n")]


def _project_copy(folder: Path) -> Path:
    """The project's runnable files, with the shipped data cut to test size under its shipped paths."""
    folder.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, folder / name)
    squad = folder / "data" / "squad"
    squad.mkdir(parents=True)
    (squad / "train.json").write_text(json.dumps(squad_subset(SQUAD_TRAIN, 35, 80)), encoding="utf-8")
    validation = squad_subset(SQUAD_VALIDATION, 4, 30)
    (squad / "validation.json").write_text(json.dumps(validation), encoding="utf-8")
    # The user's own predictions file for `score`: the first gold answer of every other question.
    qas = [qa for article in validation["data"] for p in article["paragraphs"] for qa in p["qas"]]
    (folder / "predictions.json").write_text(json.dumps(
        {qa["id"]: qa["answers"][0]["text"] for qa in qas[::2]}), encoding="utf-8")
    return folder


def _user_environment(home: Path) -> dict[str, str]:
    """This interpreter's tools first on PATH, no tracking URI or experiment chosen, and this checkout's code."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["FINETUNE_MLFLOW_HOME"] = str(home)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


@pytest.mark.readme
def test_every_marked_readme_block_runs_as_written_on_a_fresh_store(tmp_path):
    blocks = readme_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert [name for name, _, _ in blocks][:2] == ["fresh-store", "load-champion"], \
        "the README's command sequence lost its readme-test marker"
    project = _project_copy(tmp_path / "project")
    env = _user_environment(tmp_path / "home")
    for name, language, body in blocks:
        command = ["bash", "-euo", "pipefail", "-c", body] if language == "bash" else [sys.executable, "-c", body]
        done = subprocess.run(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
        output = done.stdout.decode(errors="replace")
        assert done.returncode == 0, f"README block {name!r} failed ({done.returncode}):\n{output[-6000:]}"
        if language == "bash":  # our commands; a user's own MLflow calls keep MLflow's default
            assert "Downloading artifacts" not in output, f"README block {name!r} printed download progress bars"
    # What the sequence promised, read back from the store it made.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("squad-qa-local", "champion")
    previous = client.get_model_version_by_alias("squad-qa-local", "previous_champion")
    assert (str(champion.version), str(previous.version)) == ("1", "2"), "rollback put the first champion back"
    assert (project / "report" / "report.html").exists() and (project / "report" / "report.md").exists()
    sweep = client.get_experiment_by_name("squad-local-sweep")
    children = client.search_runs([sweep.experiment_id], "tags.`finetune.step` = 'tune'")
    assert len(children) == 6 and len({r.info.run_name for r in children}) == 6


@pytest.mark.parametrize("name", sorted(USER_FILES))
def test_user_files_are_named_in_the_readme(name):
    """A file the test supplies must be one the README tells the user to bring, not a hidden fixture."""
    assert name in (ROOT / "README.md").read_text(encoding="utf-8")
