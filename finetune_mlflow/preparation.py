"""Prepared data: raw QA data -> clean, deduplicated, validated splits in every provider's tuning format, logged as
one `prepare` run and found again by its data fingerprint (the `prepare` step and every step that needs data).

Artifacts out, under `prepared/`: `train.jsonl`/`validation.jsonl` (canonical: id, title, question, context,
answers), one folder per provider that has its own record format (`openai/`, `vertex/`) with both splits, `dropped.jsonl` (every
dropped row with its file, line and reason), `manifest.json`. Metrics: `n_raw`, `n_duplicates_dropped`,
`n_invalid_dropped`, `n_train`, `n_val`, `tokens_{mean,p50,p95,max}` (approximate). Params: `data_sha256` and the
data config. Inputs: both splits as MLflow datasets. Tags: `finetune.step=prepare`, `finetune.data_sha256`.

Rows stream from the reader through the cleaning steps into the output files; what is held per row is its
deduplication keys (`cleaning.deduplicate`). Splitting one file by article spools the cleaned rows to disk until
the set of articles, and with it the held-out ones, is known.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

from finetune_mlflow import cleaning
from finetune_mlflow.config import Config
from finetune_mlflow.costing import approx_tokens
from finetune_mlflow.errors import DataError
from finetune_mlflow.providers import training_records
from finetune_mlflow.records import (Example, input_blocks, iter_jsonl, jsonl_line, open_jsonl, read_examples,
                                     read_jsonl)
from finetune_mlflow.scratch import download_artifacts, scratch_dir
from finetune_mlflow.stats import counted_percentiles
from finetune_mlflow.tracking import code_version, find_finished_run, log_values, step_run

logger = logging.getLogger(__name__)

Drop = Callable[[dict], None]  # takes each dropped row's file, line, id and reason

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
    """A local path, or any URI MLflow can download (`runs:/<id>/prepared/train.jsonl`, `s3://...`); a download
    that fails (closed port, no credentials, a scheme MLflow has no client for) is a DataError naming the URI."""
    if "://" in uri or uri.startswith("runs:/") or uri.startswith("models:/"):
        try:
            return download_artifacts(artifact_uri=uri)
        except Exception as e:  # noqa: BLE001 - each artifact client raises its own types; all mean "cannot read"
            detail = (str(e).strip().splitlines() or [""])[0][:300] or type(e).__name__
            raise DataError(uri, None, f"cannot download ({type(e).__name__}: {detail}); give a local path, a "
                            "runs:/ URI, or a store MLflow can read with the credentials in this environment"
                            ) from e
    return Path(uri)


def data_fingerprint(config: Config) -> str:
    """Hash of the input bytes plus the data config: equal fingerprints mean identical prepared output."""
    digest = hashlib.sha256(config.sha256("data").encode())
    for uri in (config.data.train_data, config.data.validation_data):
        if uri:
            path = resolve_input(uri)
            for block in input_blocks(path) if path.is_file() else [uri.encode()]:
                digest.update(block)
    return digest.hexdigest()


def _cleaned(path: str, config: Config, tally: cleaning.Tally, drop: Drop) -> Iterator[Example]:
    """One input's rows read, normalized, deduplicated and validated as they stream through."""
    local = resolve_input(path)

    def first_line(example_id: str) -> int | None:  # for an id conflict's message: the input read again
        return next((e["source_line"] for e in read_examples(local) if e["id"] == example_id), None)

    rows = cleaning.deduplicate(cleaning.normalize_examples(read_examples(local)), path, tally, first_line)
    return cleaning.validate_examples(rows, path, extractive=config.data.extractive,
                                      max_chars=config.data.max_example_chars, on_invalid=config.data.on_invalid,
                                      tally=tally, drop=drop)


def _log_drops(path: str, tally: cleaning.Tally) -> None:
    if tally.n_duplicates or tally.n_invalid:
        logger.warning("%s: dropped %d duplicate and %d invalid rows (see prepared/dropped.jsonl)", path,
                       tally.n_duplicates, tally.n_invalid)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector paused while the rows stream through: nothing here is a cycle, and its passes
    would walk the dicts and lists of each freshly decoded article (a third of the time when prepare held every
    row)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _SplitFiles:
    """One split's JSONL files (canonical, and each provider's own format) written a row at a time, up to
    `limit` rows (0: all), which keeps the first N after cleaning; counts the rows and their token lengths."""

    def __init__(self, stack: contextlib.ExitStack, directory: Path, split: str, limit: int):
        formats = {"": cleaning.canonical_row, **training_records()}
        self.files = [(convert, stack.enter_context(open_jsonl(directory / folder / f"{split}.jsonl")))
                      for folder, convert in formats.items()]
        self.limit, self.count, self.tokens = limit, 0, collections.Counter()

    def add(self, example: Example) -> None:
        if self.limit and self.count >= self.limit:
            return
        self.count += 1
        self.tokens[approx_tokens(example["question"] + example["context"] + example["answers"][0])] += 1
        for convert, handle in self.files:
            handle.write(jsonl_line(convert(example)))


def _write_each(config: Config, splits: dict[str, _SplitFiles], drop: Drop) -> list[cleaning.Tally]:
    """Train and validation files, each streamed into its own split; warns of articles in both."""
    tallies, titles = [], []
    for path, split in ((config.data.train_data, splits["train"]), (config.data.validation_data,
                                                                   splits["validation"])):
        tallies.append(cleaning.Tally())
        titles.append(set())
        for example in _cleaned(path, config, tallies[-1], drop):
            split.add(example)
            titles[-1].add(example["title"])
        _log_drops(path, tallies[-1])
    overlap = sorted((titles[0] & titles[1]) - {""})
    if overlap:
        logger.warning("articles in both splits (leaks answers into validation): %s", ", ".join(overlap[:5]))
    return tallies


def _write_split(config: Config, splits: dict[str, _SplitFiles], drop: Drop) -> list[cleaning.Tally]:
    """One file split by article: the cleaned rows are spooled to disk while their articles are collected, then
    sent to their split once the held-out articles are known."""
    tally, articles = cleaning.Tally(), set()
    with tempfile.TemporaryDirectory(prefix="finetune-mlflow-spool-") as folder:
        spool = Path(folder) / "cleaned.jsonl"
        with open_jsonl(spool) as handle:
            for example in _cleaned(config.data.train_data, config, tally, drop):
                articles.add(cleaning.article_key(example))
                handle.write(jsonl_line(cleaning.canonical_row(example)))
        _log_drops(config.data.train_data, tally)
        held_out = cleaning.held_out_articles(articles, config.data.validation_fraction)
        for row in iter_jsonl(spool):
            splits["validation" if cleaning.article_key(row) in held_out else "train"].add(row)
    return [tally]


def write_splits(config: Config, directory: Path) -> tuple[dict[str, int], dict[str, float]]:
    """Clean both inputs (or split the one) into the prepared files of `directory` as the rows stream through;
    returns the counts and the train split's token statistics."""
    limits = {"train": config.data.max_examples, "validation": config.data.max_validation_examples}
    with _collector_paused(), contextlib.ExitStack() as stack:
        dropped = stack.enter_context(open_jsonl(directory / "dropped.jsonl"))
        splits = {split: _SplitFiles(stack, directory, split, limit) for split, limit in limits.items()}
        write = _write_each if config.data.validation_data else _write_split
        tallies = write(config, splits, lambda row: dropped.write(jsonl_line(row)))
    counts = {"n_raw": sum(t.n_raw for t in tallies), "n_duplicates_dropped": sum(t.n_duplicates for t in tallies),
              "n_invalid_dropped": sum(t.n_invalid for t in tallies), "n_train": splits["train"].count,
              "n_val": splits["validation"].count}
    return counts, token_stats(splits["train"].tokens)


def token_stats(lengths: Mapping[int, int]) -> dict[str, float]:
    """Mean, median, p95 and max of approximate token lengths held as length -> rows (as numpy computes them)."""
    n = sum(lengths.values())
    if not n:
        return {}
    p50, p95 = counted_percentiles(lengths, (50, 95))
    return {"tokens_mean": sum(length * count for length, count in lengths.items()) / n, "tokens_p50": p50,
            "tokens_p95": p95, "tokens_max": float(max(length for length, count in lengths.items() if count))}


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
        directory = scratch_dir("prepared") / PREPARED
        counts, tokens = write_splits(config, directory)
        if not counts["n_train"] or not counts["n_val"]:
            raise DataError(config.data.train_data, None, f"after cleaning, train has {counts['n_train']} and "
                            f"validation {counts['n_val']} examples; both need at least one")
        manifest = {"data_sha256": fingerprint, "counts": counts, "code_version": code_version(),
                    "train_data": config.data.train_data, "validation_data": config.data.validation_data}
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        mlflow.log_artifacts(str(directory), PREPARED)
        log_values(mlflow.tracking.MlflowClient(), run.info.run_id, metrics={**counts, **tokens},
                   params={"data_sha256": fingerprint, **config.section_params("data")})
        source = config.data.train_data
        _log_dataset(fingerprint, source, "train", "training")
        _log_dataset(fingerprint, config.data.validation_data or source, "validation", "validation")
        logger.info("prepared %d train / %d validation examples (run %s)", counts["n_train"], counts["n_val"],
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
