"""Typed experiment configuration: defaults < experiments/*.yaml < entry-point parameters.

Every section is a frozen dataclass so a typo in YAML or a wrong type fails before any run starts or money is
spent. Secrets never live here: API keys and tokens come from the environment inside each provider.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import yaml

from finetune_mlflow import run_names
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.lifecycle_entries import lifecycle_entry_problem

OnInvalid = Literal["fail", "drop"]
CheckpointChoice = Literal["auto", "all", "last", "best_val_loss"]
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_DEPTH = 32  # experiment files are two levels deep; deeper nesting only exhausts the parser's stack
MAX_NUMBER_CHARS = 100  # no knob needs a longer number; Python refuses ints past 4,300 digits with a traceback
MAX_TEXT_CHARS = 1_000  # any text knob (a model id, a path, a suffix)
MAX_EXPERIMENT_CHARS = 500  # MLflow's own limit on an experiment name


def knob(default: Any, help: str, *, flag: str = "", low: float | None = None, high: float | None = None,
         open_low: bool = False, choices: tuple = (), factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its one description: `help` (CLI `--help` and the README table), bounds checked at
    load time (`low <= value <= high`, or `low < value` with `open_low`), allowed `choices`, and `flag`, the name
    it takes as an entry-point parameter (`-P epochs=2` -> `--epochs 2`) when it has one."""
    metadata = {"help": help, "flag": flag, "low": low, "high": high, "open_low": open_low, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def provider_section(cls: type) -> Any:
    """A provider's config section: its name is the provider's name (`tune.provider` chooses among them)."""
    return field(default_factory=cls, metadata={"provider": True})


@dataclass(frozen=True)
class DataConfig:
    train_data: str = knob("data/squad/train.json", "training data: SQuAD JSON, JSONL or CSV (path or URI)",
                           flag="train_data")
    validation_data: str = knob("data/squad/validation.json", "validation data; empty: split train_data by "
                                "article", flag="validation_data")
    validation_fraction: float = knob(0.2, "share of articles held out when validation_data is empty",
                                      low=0, high=0.9, open_low=True)
    max_examples: int = knob(0, "first N training examples after cleaning (0: all)", flag="max_examples",
                             low=0, high=10_000_000)
    max_validation_examples: int = knob(0, "first N validation examples after cleaning (0: all)",
                                        flag="max_validation_examples", low=0, high=10_000_000)
    max_example_chars: int = knob(20000, "longer examples are refused (token limits and cost)", low=1,
                                  high=10_000_000)
    on_invalid: OnInvalid = knob("fail", "an invalid row fails prepare, or is dropped and counted",
                                 flag="on_invalid")
    extractive: bool = knob(True, "every answer must occur inside its context (SQuAD)")


@dataclass(frozen=True)
class TuneConfig:
    provider: str = knob("local", "which provider tunes: a provider section's name", flag="provider")
    base_model: str = knob("span-ranker-base", "the model tuning starts from", flag="base_model")
    epochs: int = knob(3, "passes over the training data", flag="epochs", low=1, high=100)
    learning_rate: float = knob(0.005, "local: the Adam step; cloud providers: the learning-rate multiplier",
                                flag="learning_rate", low=0, high=100, open_low=True)
    batch_size: int = knob(0, "examples per step; 0: the provider's default", flag="batch_size", low=0, high=4096)
    registered_model_name: str = knob("", "registered model; empty: squad-qa-<provider>",
                                      flag="registered_model_name")
    poll_interval: float = knob(1.0, "seconds between job polls", flag="poll_interval", low=0.01, high=3600)
    timeout_seconds: float = knob(24 * 3600.0, "stop watching after this long; the job keeps running and a rerun "
                                  "with --run-id reattaches", low=1, high=30 * 24 * 3600)
    seed: int = knob(0, "training seed", low=0, high=2**31 - 1)
    suffix: str = knob("squad", "suffix of the tuned model's name where the provider takes one")
    max_cost_usd: float = knob(0.0, "refuse to launch a job estimated above this (0: no limit)",
                               flag="max_cost_usd", low=0, high=1e6)


@dataclass(frozen=True)
class EvaluateConfig:
    max_concurrency: int = knob(4, "requests in flight at once", flag="max_concurrency", low=1, high=256)
    max_error_rate: float = knob(0.05, "the evaluation fails above this share of failed requests", low=0, high=1)
    bootstrap_samples: int = knob(1000, "bootstrap resamples for the 95% intervals", low=100, high=100_000)
    bootstrap_seed: int = knob(0, "seed of the bootstrap", low=0, high=2**31 - 1)
    max_output_tokens: int = knob(32, "longest answer a model may generate", low=1, high=4096)
    request_retries: int = knob(4, "retries of a failed provider call (429/5xx/reset)", low=0, high=20)
    retry_backoff_seconds: float = knob(0.5, "first wait before a retry; doubles each time; Retry-After wins",
                                        low=0, high=300)
    trace_samples: int = knob(50, "evaluation requests recorded as spans of the evaluation's MLflow trace (wrong "
                              "answers first; 0: off)", low=0, high=10_000)
    checkpoints: CheckpointChoice = knob("auto", "which of a job's checkpoints are evaluated as candidates: all, "
                                         "last, best_val_loss, or auto (all when at most 4, else best_val_loss "
                                         "and last)", flag="checkpoints")
    max_cost_usd: float = knob(0.0, "refuse an evaluation (all its models) estimated above this (0: no limit)",
                               flag="eval_max_cost_usd", low=0, high=1e6)


@dataclass(frozen=True)
class PromotionConfig:
    alias: str = knob("champion", "the alias promotion moves")
    min_f1_gain: float = knob(0.0, "the 95% lower bound of the paired F1 gain must exceed this (F1 points)",
                              low=-100, high=100)
    max_latency_ms_p95: float = knob(0.0, "latency gate in ms (0: off)", low=0, high=3.6e6)
    max_error_rate: float = knob(0.05, "error-rate gate", low=0, high=1)
    min_days_to_shutdown: int = knob(30, "refuse a candidate whose model shuts down within this many days "
                                     "(force=true with a reason overrides)", low=0, high=36500)


@dataclass(frozen=True)
class LifecycleConfig:
    """When models stop answering, where the provider does not say: dated entries, never dates in code."""

    warn_days: int = knob(45, "evaluate, promote, loading and serving a version log a warning when its model "
                          "shuts down within this many days", low=0, high=36500)
    models: dict[str, dict[str, str]] = knob(
        None, "model id -> {shutdown_date: YYYY-MM-DD, source: where it was published, as_of: YYYY-MM-DD the "
        "source was read, stage (optional), new_jobs: open|closed (optional)}; used when the provider reports "
        "nothing for that model", factory=dict)


@dataclass(frozen=True)
class LocalConfig:
    jobs_dir: str = knob("", "where local jobs live; empty: $FINETUNE_MLFLOW_HOME/local-jobs or "
                         "~/.cache/finetune-mlflow/local-jobs")
    max_span_tokens: int = knob(8, "longest answer span considered, in tokens", low=1, high=64)
    eval_every_steps: int = knob(10, "val_loss every N training steps", low=1, high=1_000_000)
    validation_loss_examples: int = knob(300, "validation examples val_loss is computed on", low=1,
                                         high=1_000_000)
    average_every_steps: int = knob(8, "checkpoints hold the running mean of the weights taken every N steps "
                                    "and at each epoch's end (0: the latest weights)", low=0, high=1_000_000)


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str = knob("", "API base URL; empty: OPENAI_BASE_URL, else api.openai.com")
    max_retries: int = knob(4, "retries of a failed management call", low=0, high=20)
    request_timeout_seconds: float = knob(60.0, "per-request timeout", low=1, high=3600)
    training_price_per_million_tokens: dict[str, float] = knob(None, "USD per 1M training tokens by base model "
                                                               "(dated in the YAML)", factory=dict)
    inference_price_per_million_tokens: dict[str, dict[str, float]] = knob(
        None, "USD per 1M tokens by model, {input: x, output: y}; tuned models under ft:<base model> (dated in "
        "the YAML)", factory=dict)
    context_limit_tokens: int = knob(65536, "longest example the base model accepts", low=1, high=10_000_000)


@dataclass(frozen=True)
class VertexConfig:
    project: str = knob("", "GCP project; empty: GOOGLE_CLOUD_PROJECT, else the ADC project")
    location: str = knob("", "region; empty: GOOGLE_CLOUD_LOCATION, else us-central1")
    staging_bucket: str = knob("", "Cloud Storage bucket for the data; empty: FINETUNE_VERTEX_STAGING_BUCKET")
    staging_prefix: str = knob("finetune-mlflow", "object prefix in the staging bucket")
    api_endpoint: str = knob("", "Vertex API endpoint; empty: https://{location}-aiplatform.googleapis.com")
    storage_endpoint: str = knob("", "Cloud Storage endpoint; empty: the client default")
    adapter_size: int = knob(4, "LoRA adapter size (the base model's documented sizes); 0: Vertex's default",
                             choices=(0, 1, 2, 4, 8, 16, 32))
    tensorboard: str = knob("", "TensorBoard to read curves from; empty: the job experiment's backing one")
    request_timeout_seconds: float = knob(60.0, "per-request timeout", low=1, high=3600)
    thinking_budget: int = knob(0, "thinking tokens a 2.5 model may spend per answer: 0 turns thinking off, as Vertex "
                                "recommends for tuned models (2.5 Pro cannot: it gets its lowest, 128); -1: the "
                                "model decides", low=-1, high=32768)
    quota_backoff_seconds: float = knob(1.0, "first wait after a 429 RESOURCE_EXHAUSTED that names no wait (Vertex "
                                        "sends no Retry-After); doubles, jittered, capped at 32 s", low=0, high=300)
    training_price_per_million_tokens: dict[str, float] = knob(None, "USD per 1M training tokens by base model "
                                                               "(dated in the YAML)", factory=dict)
    inference_price_per_million_tokens: dict[str, dict[str, float]] = knob(
        None, "USD per 1M tokens by base model, {input: x, output: y}; tuned endpoints bill at their base "
        "model's rate (dated in the YAML)", factory=dict)
    max_example_tokens: int = knob(131072, "longest example the base model accepts", low=1, high=10_000_000)
    max_validation_examples: int = knob(5000, "Vertex's limit on validation examples", low=1, high=1_000_000)


@dataclass(frozen=True)
class TogetherConfig:
    """LoRA fine-tuning on Together AI (tune.base_model: a Together model string that supports fine-tuning)."""

    base_url: str = knob("", "API base URL; empty: TOGETHER_BASE_URL, else api.together.ai")
    max_retries: int = knob(4, "retries of a failed management call (429/5xx/reset)", low=0, high=20)
    request_timeout_seconds: float = knob(60.0, "per-request timeout", low=1, high=3600)
    lora_r: int = knob(8, "LoRA rank; checked against the model's max_rank before launch", low=1, high=1024)
    lora_alpha: int = knob(16, "LoRA alpha (scale = alpha / r)", low=1, high=4096)
    lora_dropout: float = knob(0.0, "dropout on the LoRA path", low=0, high=0.99)
    lora_trainable_modules: str = knob("all-linear", "comma-separated modules LoRA adapts, or all-linear; "
                                       "checked against the model's target_modules")
    n_evals: int = knob(4, "validation-loss evaluations over the job (0: none)", low=0, high=1000)
    n_checkpoints: int = knob(3, "checkpoints the job keeps (each a candidate model)", low=1, high=1000)
    max_seq_length: int = knob(0, "training sequence length; 0: the model's SFT maximum", low=0, high=10_000_000)
    training_price_per_million_tokens: dict[str, float] = knob(None, "USD per 1M training tokens by base model "
                                                               "(dated in the YAML)", factory=dict)
    inference_price_per_million_tokens: dict[str, dict[str, float]] = knob(
        None, "USD per 1M tokens by model, {input: x, output: y}; a serverless LoRA model bills under its base "
        "model's name (dated in the YAML)", factory=dict)


@dataclass(frozen=True)
class TransformersConfig:
    """LoRA fine-tuning of an open-weights causal LM (tune.base_model: a hub id, a model folder or a .gguf file)."""

    jobs_dir: str = knob("", "where jobs keep status, events, checkpoints and the merged model; empty: "
                         "$FINETUNE_MLFLOW_HOME/hf-jobs or ~/.cache/finetune-mlflow/hf-jobs")
    lora_r: int = knob(8, "LoRA rank", low=1, high=1024)
    lora_alpha: int = knob(16, "LoRA alpha (scale = alpha / r)", low=1, high=4096)
    lora_dropout: float = knob(0.05, "dropout on the LoRA path", low=0, high=0.9)
    target_modules: str = knob("q_proj,v_proj", "comma-separated module names LoRA adapts, or all-linear")
    max_seq_length: int = knob(1024, "prompt + answer tokens; a longer example is refused before training",
                               low=16, high=131072)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = knob("auto", "auto: bf16 on a GPU that has it, else fp32")
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "auto: cuda when there is a GPU, else cpu")
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step", low=1, high=1024)
    eval_batch_size: int = knob(8, "questions per batched greedy generation", low=1, high=1024)
    max_new_tokens: int = knob(32, "longest generated answer", low=1, high=4096)
    logging_steps: int = knob(5, "train_loss every N steps", low=1, high=100_000)
    eval_steps: int = knob(20, "val_loss every N steps and at every epoch end (0: epoch ends only)", low=0,
                           high=1_000_000)
    val_loss_examples: int = knob(64, "validation examples val_loss is computed on", low=1, high=1_000_000)
    save_steps: int = knob(0, "a resumable checkpoint every N steps besides each epoch's (0: epoch ends only)",
                           low=0, high=1_000_000)
    max_restarts: int = knob(3, "how often a rerun may restart a trainer that died before the job fails",
                             low=0, high=100)
    num_processes: int = knob(1, "data-parallel training processes through `accelerate launch` (one per GPU; on the "
                              "CPU, gloo processes); 1: a single process", low=1, high=256)


@dataclass(frozen=True)
class Config:
    experiment: str = knob("", "MLflow experiment the runs go to (created on first use); MLflow's own "
                           "--experiment-name / MLFLOW_EXPERIMENT_NAME win")
    data: DataConfig = field(default_factory=DataConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    local: LocalConfig = provider_section(LocalConfig)
    openai: OpenAIConfig = provider_section(OpenAIConfig)
    vertex: VertexConfig = provider_section(VertexConfig)
    transformers: TransformersConfig = provider_section(TransformersConfig)
    together: TogetherConfig = provider_section(TogetherConfig)
    # Where this config was loaded from (not a YAML key): logged as the `config_file` param.
    config_file: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "config_file"}

    def sha256(self, *sections: str) -> str:
        """Hash of the given sections (all by default), stable across key order, for run reuse lookups."""
        full = self.to_dict()
        chosen = {name: full[name] for name in (sections or tuple(full))}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()

    def section_params(self, section: str) -> dict[str, str]:
        """One section as `section.key` -> string, the shape MLflow params take."""
        values = dataclasses.asdict(getattr(self, section))
        return {f"{section}.{k}": json.dumps(v) if isinstance(v, dict) else str(v) for k, v in values.items()}

    def run_params(self) -> dict[str, str]:
        """The knobs that define a tuning run, each under one name, plus the active provider's section."""
        tune = self.tune
        return {"provider": tune.provider, "base_model": tune.base_model, "epochs": str(tune.epochs),
                "learning_rate": str(tune.learning_rate), "batch_size": str(tune.batch_size),
                "config_file": self.config_file or "<defaults>", **self.section_params(tune.provider)}

    def run_name(self, step: str) -> str:
        """What a person reads in the runs table: `tune openai/gpt-4o-mini e3 lr1.8` (see `run_names`)."""
        return run_names.run_name(self, step)


def provider_sections() -> tuple[str, ...]:
    """Names of the provider sections, i.e. the providers a config can choose."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("provider"))


def _knobs() -> Iterator[tuple[str, dataclasses.Field]]:
    """Every (dotted key, field) of the config, sections expanded."""
    for top in dataclasses.fields(Config):
        if top.metadata.get("internal"):
            continue
        if isinstance(top.default_factory, type):  # a section
            for inner in dataclasses.fields(top.default_factory):
                yield f"{top.name}.{inner.name}", inner
        else:
            yield top.name, top


def entry_flags() -> dict[str, tuple[str, str]]:
    """Entry-point parameter name -> (dotted config key, help): what `-P name=value` may set."""
    return {f.metadata["flag"]: (key, f.metadata["help"]) for key, f in _knobs() if f.metadata.get("flag")}


def knob_table() -> str:
    """Every knob as a markdown table (the README's; `finetune-mlflow knobs` prints it): key, `-P` name, default,
    allowed values, meaning."""
    lines = ["| key | `-P` name | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, f in _knobs():
        meta = f.metadata
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        allowed = ", ".join(map(str, meta["choices"])) if meta.get("choices") else (
            f"{'>' if meta.get('open_low') else '>='} {meta['low']:g}" + (f", <= {meta['high']:g}" if meta.get(
                "high") is not None else "") if meta.get("low") is not None else "")
        flag = f"`{meta['flag']}`" if meta.get("flag") else ""
        lines.append(f"| `{key}` | {flag} | `{json.dumps(default)}` | {allowed} | {meta.get('help', '')} |")
    return "\n".join(lines) + "\n"


# Where a dotted key's value came from, for error messages: "file.yaml:7", "parameter epochs" or "<defaults>".
Origin = Callable[[str], str]


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """1-based line of every (nested) mapping key in a composed YAML document, as `section.key` -> line."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            lines.setdefault(dotted, key_node.start_mark.line + 1)
            lines.update({k: v for k, v in _key_lines(value_node, dotted + ".").items() if k not in lines})
    return lines


def _origin(source: str, lines: dict[str, int], parameters: dict[str, str]) -> Origin:
    def origin(key: str) -> str:
        for dotted, name in parameters.items():
            if key == dotted or key.startswith(dotted + "."):
                return f"parameter {name}"
        for candidate in (key, key.rsplit(".", 1)[0]):  # the key's own line, else its section's
            if candidate in lines:
                return f"{source}:{lines[candidate]}"
        return source
    return origin


def _coerce(value: Any, annotation: Any, key: str, origin: Origin) -> Any:
    """Check (and gently coerce, e.g. "3" -> 3 from the command line) one value against its declared type."""
    where = f"{origin(key)}: {key}"
    kind = typing.get_origin(annotation)
    if kind is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        _, value_type = typing.get_args(annotation)
        return {str(k): _coerce(v, value_type, f"{key}.{k}", origin) for k, v in value.items()}
    if kind in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported union type")  # pragma: no cover - no such field today
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {_shown(value)}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {_shown(value)}")
        try:
            number = annotation(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {_shown(value)}") from None
        if annotation is int and (not isinstance(number, int) or isinstance(number, float)):
            if isinstance(number, float) and number.is_integer():
                return int(number)
            raise ConfigError(f"{where}: expected an integer, got {_shown(value)}")
        if not isinstance(number, (int, float)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {_shown(value)}")
        return annotation(number)
    if annotation is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2027-01-14 as a date
            return value.isoformat()
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {_shown(value)}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {annotation}")  # pragma: no cover


def _build(cls: type, values: dict[str, Any], key: str, origin: Origin) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(values) - known)
    if unknown:
        section = f"{key}: " if key else ""
        raise ConfigError(f"{origin(f'{key}.{unknown[0]}' if key else unknown[0])}: {section}unknown key "
                          f"{unknown[0]!r}; expected one of: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        dotted = f"{key}.{name}" if key else name
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin(dotted)}: {dotted}: expected a mapping, got {_shown(value)}")
            kwargs[name] = _build(hints[name], value, dotted, origin)
        else:
            kwargs[name] = _coerce(value, hints[name], dotted, origin)
    return cls(**kwargs)


def _shown(value: Any) -> str:
    """A value for a message: its repr, cut at 200 characters (a hostile value must not fill the screen)."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text):,} characters)"


def _out_of_bounds(value: Any, meta: Mapping[str, Any]) -> str | None:
    """What is wrong with a value against its knob's bounds and choices, or None."""
    if meta.get("choices") and value not in meta["choices"]:
        return f"one of {', '.join(map(str, meta['choices']))}"
    if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        return f"at most {MAX_TEXT_CHARS} characters (got {len(value):,})"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    low, high = meta.get("low"), meta.get("high")
    if not math.isfinite(value):
        return "a finite number"
    if low is not None and (value <= low if meta.get("open_low") else value < low):
        return f"{'>' if meta.get('open_low') else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
    if high is not None and value > high:
        return f"<= {high:g}" + (f" and >= {low:g}" if low is not None else "")
    return None


def _validate(config: Config, origin: Origin) -> None:
    """Every knob against its bounds, then the rules that span fields, before any run starts or money is spent."""
    for key, f in _knobs():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section), name) if section else getattr(config, name)
        expected = _out_of_bounds(value, f.metadata)
        if expected:
            raise ConfigError(f"{origin(key)}: {key} is {_shown(value)}; expected {expected}")
    if len(config.experiment) > MAX_EXPERIMENT_CHARS:
        raise ConfigError(f"{origin('experiment')}: experiment name has {len(config.experiment):,} characters; MLflow "
                          f"allows at most {MAX_EXPERIMENT_CHARS}")
    if config.tune.provider not in provider_sections():
        raise ConfigError(f"{origin('tune.provider')}: tune.provider: unknown provider {config.tune.provider!r}; expected one of "
                          f"{', '.join(provider_sections())}")
    if not MODEL_NAME.fullmatch(config.tune.registered_model_name):
        raise ConfigError(f"{origin('tune.registered_model_name')}: tune.registered_model_name "
                          f"{config.tune.registered_model_name!r} must be 1-100 letters, digits, '.', '_' or '-' "
                          "(no slashes or spaces)")
    for model, entry in config.lifecycle.models.items():
        problem = lifecycle_entry_problem(entry)
        if problem:
            raise ConfigError(f"{origin(f'lifecycle.models.{model}')}: lifecycle.models.{model}: {problem}")
    for key, url in (("openai.base_url", config.openai.base_url), ("together.base_url", config.together.base_url),
                     ("vertex.api_endpoint", config.vertex.api_endpoint),
                     ("vertex.storage_endpoint", config.vertex.storage_endpoint)):
        parts = urllib.parse.urlsplit(url)
        if parts.username or parts.password or parts.query:
            # The value itself is not repeated: it holds the secret this check keeps out of params and artifacts.
            raise ConfigError(f"{origin(key)}: {key} carries credentials or a query string; config is logged as run "
                              "params and stored with registered models, so give the bare endpoint and put keys in "
                              "the environment (OPENAI_API_KEY, TOGETHER_API_KEY, Application Default Credentials)")


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML without aliases (an alias bomb expands without bound) or duplicate keys (the last would win
    silently)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed in experiment files",
                                       problem_mark=event.start_mark)
        if self.depth >= MAX_YAML_DEPTH:
            raise yaml.MarkedYAMLError(problem=f"nested deeper than {MAX_YAML_DEPTH} levels",
                                       problem_mark=self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_yaml_int(self, node: Any) -> Any:
        if len(str(node.value)) > MAX_NUMBER_CHARS:
            raise yaml.MarkedYAMLError(problem=f"a number of {len(str(node.value)):,} characters (at most "
                                       f"{MAX_NUMBER_CHARS})", problem_mark=node.start_mark)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.value in seen:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key_node.value!r}",
                                           problem_mark=key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _read_yaml(path: Path, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The YAML mapping and the line of every key, or a ConfigError naming the file (and line)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{source}: {path.stat().st_size} bytes; an experiment file is at most "
                              f"{MAX_CONFIG_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist; pass -P config=experiments/<name>.yaml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read the config file ({getattr(e, 'strerror', None) or e})") from None
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        loaded = _StrictLoader(text).get_single_data() if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
    return loaded, _key_lines(node)


def _apply_overrides(merged: dict[str, Any], overrides: Mapping[str, Any], source: str) -> dict[str, str]:
    """Put entry-point parameters (flag names or `section.key`) into the merged mapping; returns dotted -> name."""
    flags = entry_flags()
    parameters: dict[str, str] = {}
    for name, value in overrides.items():
        if value is None or value == "":
            continue  # an entry-point parameter left empty means "keep the config's value"
        dotted = flags[name][0] if name in flags else name
        if "." not in dotted:
            raise ConfigError(f"unknown parameter {name!r}; expected one of {', '.join(sorted(flags))} or "
                              "section.key (e.g. -P local.max_span_tokens=6)")
        section, key = dotted.split(".", 1)
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        merged[section][key] = value
        parameters[dotted] = name
    return parameters


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load a YAML experiment, apply entry-point overrides (flag names or `section.key`), validate."""
    source = str(path) if path else "<defaults>"
    raw, lines = _read_yaml(Path(path), source) if path else ({}, {})
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    merged.pop("sweep", None)  # the sweep block is read by the sweep entry point (`sweep.py`)
    merged.pop("migration", None)  # read by the migrate entry point (`migration_plan.py`)
    parameters = _apply_overrides(merged, overrides or {}, source)
    origin = _origin(source, lines, parameters)
    config = _build(Config, merged, "", origin)
    config = dataclasses.replace(config, config_file=str(path) if path else "")
    if not config.tune.registered_model_name.strip():
        config = dataclasses.replace(config, tune=dataclasses.replace(
            config.tune, registered_model_name=f"squad-qa-{config.tune.provider}"))
    _validate(config, origin)
    return config


def with_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """`config` with dotted or flag-name overrides applied and validated (a sweep's grid point)."""
    merged = config.to_dict()
    parameters = _apply_overrides(merged, overrides, config.config_file or "<defaults>")
    origin = _origin(config.config_file or "<defaults>", {}, parameters)
    built = dataclasses.replace(_build(Config, merged, "", origin), config_file=config.config_file)
    _validate(built, origin)
    return built


def knob_value(key: str, value: Any, source: str) -> Any:
    """One knob's value coerced to its declared type and checked against its bounds, as `-P`/`--set` would be
    (a sweep grid compares and passes on these, so `1e-2` and `0.01` are one value). ConfigError names `source`."""
    fields = dict(_knobs())
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {key!r}; expected a knob such as tune.epochs (see `finetune-mlflow "
                          "knobs`)")
    section = key.rpartition(".")[0]
    hints = typing.get_type_hints(next(f.default_factory for f in dataclasses.fields(Config) if f.name == section)
                                  if section else Config)
    coerced = _coerce(value, hints[key.rpartition(".")[2]], key, lambda _: source)
    expected = _out_of_bounds(coerced, fields[key].metadata)
    if expected:
        raise ConfigError(f"{source}: {key} is {coerced!r}; expected {expected}")
    return coerced


def read_raw_section(path: str | Path, section: str) -> Any:
    """One top-level block of an experiment file as plain data (the `sweep:` block), None when absent."""
    raw, _ = _read_yaml(Path(path), str(path))
    return raw.get(section)


def section_lines(path: str | Path, section: str) -> dict[str, int]:
    """The line of every key inside one top-level block, as `section.key.subkey` -> line (for file:line errors
    about blocks `load_config` leaves to their entry point, such as `sweep:`)."""
    _, lines = _read_yaml(Path(path), str(path))
    return {key: line for key, line in lines.items() if key == section or key.startswith(section + ".")}


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
