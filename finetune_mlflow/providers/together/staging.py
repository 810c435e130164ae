"""What happens to the prepared data before a job exists: read and check it (ours with line numbers, then the
SDK's own `check_file`, both local), count tokens and price it from the config's dated table, and upload it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from together.lib.utils.files import check_file

from finetune_mlflow import costing
from finetune_mlflow.errors import DataError
from finetune_mlflow.providers.base import PreflightReport, TuningRequest
from finetune_mlflow.providers.together import data

log = logging.getLogger(__name__)
FOLDER = "together"


@dataclass(frozen=True)
class Staged:
    train: Path
    validation: Path | None
    train_tokens: data.TokenCount
    validation_tokens: data.TokenCount


def paths(request: TuningRequest) -> tuple[Path, Path | None]:
    base = Path(request.prepared_dir) / FOLDER
    validation = base / "validation.jsonl"
    return base / "train.jsonl", (validation if validation.exists() else None)


def _sdk_check(path: Path) -> None:
    report = check_file(path, purpose="fine-tune")
    if not report.get("is_check_passed"):
        raise DataError(path, None, f"the together SDK's check_file refused it: {report.get('message')}")


def stage(request: TuningRequest) -> Staged:
    """Check both files and count their tokens; DataError names the file and line of the first bad record."""
    train_path, validation_path = paths(request)
    train = data.load_records(train_path)
    validation = data.load_records(validation_path) if validation_path else []
    for path in (train_path, validation_path):
        if path is not None:
            _sdk_check(path)
    return Staged(train_path, validation_path, data.count_tokens(train), data.count_tokens(validation))


def report(staged: Staged, request: TuningRequest, settings: Any) -> PreflightReport:
    n_evals = settings.n_evals if staged.validation else 0
    billed = data.billed_tokens(staged.train_tokens.total_tokens, request.epochs,
                                staged.validation_tokens.total_tokens, n_evals)
    base = request.base_model.rsplit("/", 1)[-1]
    price = costing.price_per_million(base, [settings.training_price_per_million_tokens])
    warnings = []
    if price is None:
        warnings.append(f"no training price for {base!r} under together.training_price_per_million_tokens: the "
                        "only estimate is the service's estimate_price, asked after the upload")
    return PreflightReport(n_train=staged.train_tokens.n_examples, n_validation=staged.validation_tokens.n_examples,
                           estimated_train_tokens=staged.train_tokens.total_tokens, estimated_billed_tokens=billed,
                           estimated_cost_usd=costing.estimate_cost_usd(billed, price), warnings=warnings)


def upload(transport: Any, path: Path) -> str:
    """Upload one checked file (purpose fine-tune) and return its file id."""
    file = transport.value(f"files.upload({path.name})",
                           lambda: transport.client.files.upload(path, purpose="fine-tune", check=False))
    log.info("uploaded %s as %s (%d bytes)", path, file.id, file.bytes)
    return file.id
