"""Typed experiment configuration: defaults < experiments/*.yaml < entry-point parameters.

Every section is a frozen dataclass so a typo in YAML or a wrong type fails before any run starts or money is
spent. Secrets never live here: API keys and tokens come from the environment inside each provider.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from finetune_mlflow.errors import ConfigError

ProviderName = Literal["local", "openai", "vertex", "transformers"]
OnInvalid = Literal["fail", "drop"]


@dataclass(frozen=True)
class DataConfig:
    train_data: str = "data/squad/train.json"
    # Empty: prepare splits train_data by article so no article lands in both splits.
    validation_data: str = "data/squad/validation.json"
    validation_fraction: float = 0.2
    # 0 keeps every example; otherwise the first N of each split after cleaning (deterministic).
    max_examples: int = 0
    max_validation_examples: int = 0
    # Longer examples are refused: they blow provider token limits and cost.
    max_example_chars: int = 20000
    on_invalid: OnInvalid = "fail"
    # Extractive data (SQuAD) must have every answer inside its context.
    extractive: bool = True


@dataclass(frozen=True)
class TuneConfig:
    provider: ProviderName = "local"
    base_model: str = "span-ranker-base"
    epochs: int = 3
    # For local: the SGD step size. For cloud providers: the learning-rate multiplier.
    learning_rate: float = 0.1
    # 0 means "provider default" (OpenAI "auto"); Vertex accepts no batch size at all.
    batch_size: int = 0
    # Empty: squad-qa-<provider>, so switching provider never files a model under another provider's name.
    registered_model_name: str = ""
    poll_interval: float = 1.0
    # The job keeps running past the deadline; a rerun with --run-id reattaches to it.
    timeout_seconds: float = 24 * 3600.0
    seed: int = 0
    suffix: str = "squad"
    # 0 disables the guard; otherwise tune refuses to launch a job estimated above it.
    max_cost_usd: float = 0.0


@dataclass(frozen=True)
class EvaluateConfig:
    max_concurrency: int = 4
    # The step fails when more than this fraction of requests fails.
    max_error_rate: float = 0.05
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    max_output_tokens: int = 32
    request_retries: int = 4
    # First wait before retrying a failed provider call (429/5xx/reset); doubles each time. Retry-After wins.
    retry_backoff_seconds: float = 0.5


@dataclass(frozen=True)
class PromotionConfig:
    alias: str = "champion"
    # The paired-bootstrap 95% lower bound of the F1 gain must exceed this (F1 points).
    min_f1_gain: float = 0.0
    # 0 disables the latency gate.
    max_latency_ms_p95: float = 0.0
    max_error_rate: float = 0.05


@dataclass(frozen=True)
class LocalConfig:
    # Where background training jobs keep status, events and weights; empty: ~/.cache/finetune-mlflow/local-jobs.
    jobs_dir: str = ""
    max_span_tokens: int = 8
    # Validation loss is computed every N training steps.
    eval_every_steps: int = 10
    validation_loss_examples: int = 300


@dataclass(frozen=True)
class OpenAIConfig:
    # Empty: the SDK's own resolution (OPENAI_BASE_URL, else api.openai.com).
    base_url: str = ""
    max_retries: int = 4
    request_timeout_seconds: float = 60.0
    # USD per 1M training tokens, by base model.
    training_price_per_million_tokens: dict[str, float] = field(default_factory=dict)
    context_limit_tokens: int = 65536


@dataclass(frozen=True)
class VertexConfig:
    # Empty: GOOGLE_CLOUD_PROJECT, else the Application Default Credentials project.
    project: str = ""
    # Empty: GOOGLE_CLOUD_LOCATION, else us-central1.
    location: str = ""
    # Empty: FINETUNE_VERTEX_STAGING_BUCKET. A bucket name (a gs:// prefix is accepted).
    staging_bucket: str = ""
    staging_prefix: str = "finetune-mlflow"
    # Empty: https://{location}-aiplatform.googleapis.com (tuning jobs, TensorBoard reads and prediction).
    api_endpoint: str = ""
    # Empty: the google-cloud-storage default (https://storage.googleapis.com).
    storage_endpoint: str = ""
    # LoRA adapter size: 1, 2, 4, 8, 16 or 32; 0 leaves it to Vertex.
    adapter_size: int = 4
    # Empty: the tuning job's Vertex AI Experiment's backing TensorBoard (projects/.../tensorboards/ID).
    tensorboard: str = ""
    request_timeout_seconds: float = 60.0
    training_price_per_million_tokens: dict[str, float] = field(default_factory=dict)
    max_example_tokens: int = 131072
    max_validation_examples: int = 5000


@dataclass(frozen=True)
class TransformersConfig:
    """LoRA fine-tuning of an open-weights causal LM (tune.base_model: a hub id, a model folder or a .gguf file)."""

    # Where background jobs keep status, events, checkpoints and the merged model; empty: ~/.cache/.../hf-jobs.
    jobs_dir: str = ""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # Comma-separated module names (suffixes) LoRA adapts, or "all-linear".
    target_modules: str = "q_proj,v_proj"
    # Prompt + answer tokens; an example longer than this is refused before training (truncation would cut the answer).
    max_seq_length: int = 1024
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gradient_accumulation_steps: int = 1
    eval_batch_size: int = 8
    max_new_tokens: int = 32
    logging_steps: int = 5
    # val_loss every N steps (and at every epoch end) on the first val_loss_examples validation examples.
    eval_steps: int = 20
    val_loss_examples: int = 64
    # A resumable trainer checkpoint every N steps besides each epoch's; 0: epoch ends only.
    save_steps: int = 0
    # How often a rerun may restart a trainer that died (kill -9, OOM) before the job counts as failed.
    max_restarts: int = 3


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    vertex: VertexConfig = field(default_factory=VertexConfig)
    transformers: TransformersConfig = field(default_factory=TransformersConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self, *sections: str) -> str:
        """Hash of the given sections (all by default), stable across key order, for run reuse lookups."""
        full = self.to_dict()
        chosen = {name: full[name] for name in (sections or tuple(full))}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()

    def flat_params(self) -> dict[str, str]:
        """`section.key` -> string, the shape MLflow params take."""
        out = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = json.dumps(value) if isinstance(value, dict) else str(value)
        return out


# Entry-point parameter names that map onto config fields without a section prefix.
FLAT_OVERRIDES: dict[str, str] = {
    "train_data": "data.train_data",
    "validation_data": "data.validation_data",
    "max_examples": "data.max_examples",
    "on_invalid": "data.on_invalid",
    "provider": "tune.provider",
    "base_model": "tune.base_model",
    "epochs": "tune.epochs",
    "learning_rate": "tune.learning_rate",
    "batch_size": "tune.batch_size",
    "registered_model_name": "tune.registered_model_name",
    "poll_interval": "tune.poll_interval",
    "max_cost_usd": "tune.max_cost_usd",
    "max_concurrency": "evaluate.max_concurrency",
}


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
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = annotation(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and (not isinstance(number, int) or isinstance(number, float)):
            if isinstance(number, float) and number.is_integer():
                return int(number)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if not isinstance(number, (int, float)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return annotation(number)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {annotation}")  # pragma: no cover


def _build(cls: type, values: dict[str, Any], key: str, origin: Origin) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
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
                raise ConfigError(f"{origin(dotted)}: {dotted}: expected a mapping, got {value!r}")
            kwargs[name] = _build(hints[name], value, dotted, origin)
        else:
            kwargs[name] = _coerce(value, hints[name], dotted, origin)
    return cls(**kwargs)


def _validate(config: Config, origin: Origin) -> None:
    checks = [
        (config.tune.epochs >= 1, "tune.epochs", config.tune.epochs, "an integer >= 1"),
        (config.tune.learning_rate > 0, "tune.learning_rate", config.tune.learning_rate, "a number > 0"),
        (config.tune.batch_size >= 0, "tune.batch_size", config.tune.batch_size, "0 (provider default) or more"),
        (config.tune.poll_interval > 0, "tune.poll_interval", config.tune.poll_interval, "seconds > 0"),
        (config.tune.max_cost_usd >= 0, "tune.max_cost_usd", config.tune.max_cost_usd, "0 (no limit) or more"),
        (config.data.max_examples >= 0, "data.max_examples", config.data.max_examples, "0 (all) or more"),
        (0 < config.data.validation_fraction < 1, "data.validation_fraction", config.data.validation_fraction,
         "a fraction between 0 and 1"),
        (config.evaluate.max_concurrency >= 1, "evaluate.max_concurrency", config.evaluate.max_concurrency, ">= 1"),
        (0 <= config.evaluate.max_error_rate <= 1, "evaluate.max_error_rate", config.evaluate.max_error_rate,
         "a fraction between 0 and 1"),
    ]
    hf = config.transformers
    checks += [
        (hf.lora_r >= 1, "transformers.lora_r", hf.lora_r, "an integer >= 1"),
        (0 <= hf.lora_dropout < 1, "transformers.lora_dropout", hf.lora_dropout, "a fraction in [0, 1)"),
        (bool(hf.target_modules.strip()), "transformers.target_modules", hf.target_modules, "module names"),
        (hf.max_seq_length >= 16, "transformers.max_seq_length", hf.max_seq_length, "an integer >= 16"),
        (hf.eval_batch_size >= 1, "transformers.eval_batch_size", hf.eval_batch_size, ">= 1"),
        (hf.max_new_tokens >= 1, "transformers.max_new_tokens", hf.max_new_tokens, ">= 1"),
        (hf.gradient_accumulation_steps >= 1, "transformers.gradient_accumulation_steps",
         hf.gradient_accumulation_steps, ">= 1"),
    ]
    for ok, key, value, expected in checks:
        if not ok:
            raise ConfigError(f"{origin(key)}: {key} is {value!r}; expected {expected}")
    for key, url in (("openai.base_url", config.openai.base_url), ("vertex.api_endpoint", config.vertex.api_endpoint),
                     ("vertex.storage_endpoint", config.vertex.storage_endpoint)):
        parts = urllib.parse.urlsplit(url)
        if parts.username or parts.password or parts.query:
            # The value itself is not repeated: it holds the secret this check keeps out of params and artifacts.
            raise ConfigError(f"{origin(key)}: {key} carries credentials or a query string; config is logged as run "
                              "params and stored with registered models, so give the bare endpoint and put keys in "
                              "the environment (OPENAI_API_KEY, Application Default Credentials)")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML experiment, apply entry-point overrides (flat names or `section.key`), validate."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist; pass -P config=experiments/<name>.yaml") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{source}{line}: not valid YAML ({getattr(e, 'problem', e)})") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        raw = loaded
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    parameters: dict[str, str] = {}  # dotted key -> the entry-point parameter that set it
    for name, value in (overrides or {}).items():
        if value is None or value == "":
            continue  # an entry-point parameter left empty means "keep the config's value"
        dotted = FLAT_OVERRIDES.get(name, name)
        if "." not in dotted:
            raise ConfigError(
                f"unknown parameter {name!r}; expected one of {', '.join(sorted(FLAT_OVERRIDES))} or section.key"
            )
        section, key = dotted.split(".", 1)
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        merged[section][key] = value
        parameters[dotted] = name
    origin = _origin(source, lines, parameters)
    config = _build(Config, merged, "", origin)
    if not config.tune.registered_model_name.strip():
        config = dataclasses.replace(config, tune=dataclasses.replace(
            config.tune, registered_model_name=f"squad-qa-{config.tune.provider}"))
    _validate(config, origin)
    return config


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
