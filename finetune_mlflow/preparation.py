"""Prepared data: raw QA data -> clean, deduplicated, validated splits in every provider's tuning format, logged as
one `prepare` run and found again by its data fingerprint (the `prepare` step and every step that needs data).

Artifacts out, under `prepared/`: `train.jsonl`/`validation.jsonl` (canonical: id, title, question, context,
answers), one folder per provider that has its own record format (`openai/`, `vertex/`) with both splits, `dropped.jsonl` (every
dropped row with its file, line and reason), `manifest.json`. Metrics: `n_raw`, `n_duplicates_dropped`,
`n_invalid_dropped`, `n_train`, `n_val`, `tokens_{mean,p50,p95,max}` (approximate). Params: `data_sha256` and the
data config. Inputs: both splits as MLflow datasets. Tags: `finetune.step=prepare`, `finetune.data_sha256`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

from finetune_mlflow import cleaning
from finetune_mlflow.config import Config
from finetune_mlflow.costing import approx_tokens
from finetune_mlflow.errors import DataError
from finetune_mlflow.providers import training_records
from finetune_mlflow.records import read_examples, read_input_bytes, read_jsonl, write_jsonl
from finetune_mlflow.scratch import download_artifacts, scratch_dir
from finetune_mlflow.tracking import code_version, find_finished_run, log_values, step_run

logger = logging.getLogger(__name__)

PREPARED = "prepared"


@dataclass(frozen=True)
class Prepared:
    run_id: str
    directory: Path  # local copy of the `prepared/` artifacts
    data_sha256: str

    @property
    def uri(self) -> str:
        return f"runs:/{self.run_id}/{PREPARED}"

    def split(self, name: str) -> list[dict]:
        return read_jsonl(self.directory / f"{name}.jsonl")


def resolve_input(uri: str) -> Path:
    """A local path, or any URI MLflow can download (`runs:/<id>/prepared/train.jsonl`, `s3://...`)."""
    if "://" in uri or uri.startswith("runs:/") or uri.startswith("models:/"):
        return download_artifacts(artifact_uri=uri)
    return Path(uri)


def data_fingerprint(config: Config) -> str:
    """Hash of the input bytes plus the data config: equal fingerprints mean identical prepared output."""
    digest = hashlib.sha256(config.sha256("data").encode())
    for uri in (config.data.train_data, config.data.validation_data):
        if uri:
            path = resolve_input(uri)
            digest.update(read_input_bytes(path) if path.is_file() else uri.encode())
    return digest.hexdigest()


def _clean(path: str, config: Config) -> tuple[list[dict], dict[str, int], list[dict]]:
    raw = read_examples(resolve_input(path))
    normalized = cleaning.normalize_examples(raw)
    deduplicated = cleaning.deduplicate(normalized, path)
    validated = cleaning.validate_examples(
        deduplicated.examples, path, extractive=config.data.extractive, max_chars=config.data.max_example_chars,
        on_invalid=config.data.on_invalid,
    )
    counts = {"n_raw": len(raw), "n_duplicates_dropped": deduplicated.n_dropped,
              "n_invalid_dropped": len(validated.dropped)}
    if deduplicated.n_dropped or validated.dropped:
        logger.warning("%s: dropped %d duplicate and %d invalid rows (see prepared/dropped.jsonl)", path,
                       deduplicated.n_dropped, len(validated.dropped))
    return validated.examples, counts, validated.dropped


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector paused while millions of acyclic dicts, lists and strings are built: each of its
    full passes walks them all (a third of the time of reading 100k SQuAD questions); nothing here is a cycle."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_splits(config: Config) -> tuple[list[dict], list[dict], dict[str, int], list[dict]]:
    """Clean both inputs (or split the one) and apply the example limits; returns train, val, counts, dropped."""
    with _collector_paused():
        return _build_splits(config)


def _build_splits(config: Config) -> tuple[list[dict], list[dict], dict[str, int], list[dict]]:
    train, counts, dropped = _clean(config.data.train_data, config)
    if config.data.validation_data:
        validation, val_counts, val_dropped = _clean(config.data.validation_data, config)
        counts = {key: counts[key] + val_counts[key] for key in counts}
        dropped += val_dropped
        train_titles = {e["title"] for e in train if e["title"]}
        overlap = sorted(train_titles & {e["title"] for e in validation if e["title"]})
        if overlap:
            logger.warning("articles in both splits (leaks answers into validation): %s", ", ".join(overlap[:5]))
    else:
        train, validation = cleaning.split_by_article(train, config.data.validation_fraction)
    train = cleaning.take_first(train, config.data.max_examples)
    validation = cleaning.take_first(validation, config.data.max_validation_examples)
    counts.update(n_train=len(train), n_val=len(validation))
    return train, validation, counts, dropped


def write_prepared(directory: Path, train: list[dict], validation: list[dict], dropped: list[dict]) -> None:
    for split, examples in (("train", train), ("validation", validation)):
        write_jsonl(directory / f"{split}.jsonl", map(cleaning.canonical_row, examples))
        for fmt, convert in training_records().items():
            write_jsonl(directory / fmt / f"{split}.jsonl", map(convert, examples))
    write_jsonl(directory / "dropped.jsonl", dropped)


def token_stats(examples: list[dict]) -> dict[str, float]:
    lengths = np.array([approx_tokens(e["question"] + e["context"] + e["answers"][0]) for e in examples])
    if not len(lengths):
        return {}
    return {"tokens_mean": float(lengths.mean()), "tokens_p50": float(np.percentile(lengths, 50)),
            "tokens_p95": float(np.percentile(lengths, 95)), "tokens_max": float(lengths.max())}


def _dataset_source(source: str) -> Any:
    """The MLflow dataset source for a data URI or path (the storage URI for a `runs:/` one, which dataset
    sources do not know); a source of unknown scheme (e.g. mlflow-artifacts:/) becomes an anonymous one."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if source.startswith("runs:/"):
        source = RunsArtifactRepository.get_underlying_uri(source)
    with warnings.catch_warnings():
        # MLflow warns that a local path matches two equivalent source classes; it picks the right one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        try:
            return resolve_dataset_source(source)
        except MlflowException as e:
            logger.info("dataset source %s not recognized by MLflow (%s); logging it without one", source, e.message)
            return CodeDatasetSource(tags={})


def _log_dataset(fingerprint: str, source: str, name: str, context: str) -> None:
    """Log a split as a dataset input by source, name, digest (from the data fingerprint) and its fixed schema:
    no DataFrame of every row and no schema inference over it (a second per 100k questions)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    schema = Schema([ColSpec(DataType.string, column) for column in cleaning.CANONICAL_COLUMNS])
    digest = hashlib.sha256(f"{fingerprint}:{name}".encode()).hexdigest()[:8]
    mlflow.log_input(MetaDataset(_dataset_source(source), name=name, digest=digest, schema=schema), context=context)


def prepare_data(config: Config, fingerprint: str | None = None) -> Prepared:
    """Run prepare as a (nested) `prepare` run; `fingerprint` is `data_fingerprint(config)` when the caller has it."""
    fingerprint = fingerprint or data_fingerprint(config)
    with step_run("prepare", run_name="prepare", tags={"finetune.data_sha256": fingerprint}) as run:
        train, validation, counts, dropped = build_splits(config)
        if not train or not validation:
            raise DataError(config.data.train_data, None, f"after cleaning, train has {len(train)} and validation "
                            f"{len(validation)} examples; both need at least one")
        directory = scratch_dir("prepared") / PREPARED
        write_prepared(directory, train, validation, dropped)
        manifest = {"data_sha256": fingerprint, "counts": counts, "code_version": code_version(),
                    "train_data": config.data.train_data, "validation_data": config.data.validation_data}
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        mlflow.log_artifacts(str(directory), PREPARED)
        log_values(mlflow.tracking.MlflowClient(), run.info.run_id, metrics={**counts, **token_stats(train)},
                   params={"data_sha256": fingerprint, **config.section_params("data")})
        source = config.data.train_data
        _log_dataset(fingerprint, source, "train", "training")
        _log_dataset(fingerprint, config.data.validation_data or source, "validation", "validation")
        logger.info("prepared %d train / %d validation examples (run %s)", len(train), len(validation),
                    run.info.run_id)
        return Prepared(run.info.run_id, directory, fingerprint)


def load_prepared(run_id: str, fingerprint: str) -> Prepared:
    return Prepared(run_id, download_artifacts(run_id=run_id, artifact_path=PREPARED), fingerprint)


def ensure_prepared(config: Config, fingerprint: str | None = None) -> Prepared:
    """Reuse a finished prepare run of the active run's experiment with the same data fingerprint and code
    version, or run prepare now (nested under the active run)."""
    fingerprint = fingerprint or data_fingerprint(config)
    experiment_id = mlflow.active_run().info.experiment_id
    previous = find_finished_run(experiment_id, step="prepare", data_sha256=fingerprint,
                                 code_version=code_version())
    if previous is None:
        return prepare_data(config, fingerprint)
    logger.info("reusing prepare run %s (same data fingerprint and code)", previous.info.run_id)
    return load_prepared(previous.info.run_id, fingerprint)
