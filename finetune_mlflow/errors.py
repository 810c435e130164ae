"""One exception family, so the CLI can turn any expected failure into a one-paragraph message and exit 2."""

from __future__ import annotations

from finetune_mlflow.redaction import redact


class FinetuneError(Exception):
    """Base of every error the tool expects and explains; anything else is a bug and gets a traceback."""


class RunStopped(FinetuneError):
    """A run stopped on purpose before its end (a search pruned the trial): it ends KILLED with this reason."""


class ConfigError(FinetuneError):
    """A config file or entry-point parameter is wrong; the message names the key, the value and the fix."""


class DataError(FinetuneError):
    """A data file cannot be used; carries the file, the 1-based line (or record) and the reason."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class ProviderError(FinetuneError):
    """A provider call failed; says which provider, the HTTP status and request id when known, and if retrying helps."""

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        retryable: bool = False,
    ):
        self.provider = provider
        self.status = status
        self.request_id = request_id
        self.retryable = retryable
        details = ", ".join(
            part
            for part in (
                f"status {status}" if status is not None else "",
                f"request id {request_id}" if request_id else "",
                "retryable" if retryable else "",
            )
            if part
        )
        # A provider's text can echo the credentials it was called with.
        super().__init__(redact(f"[{provider}] {message}" + (f" ({details})" if details else "")))


class TuningJobFailed(FinetuneError):
    """The provider reports the job failed or was cancelled; carries the provider's own code and message."""

    def __init__(self, job_id: str, state: str, code: str | None, message: str | None):
        self.job_id = job_id
        self.state = state
        self.code = code
        self.provider_message = redact(message) if message else message
        message = self.provider_message
        super().__init__(
            f"tuning job {job_id} ended {state}"
            + (f" with error {code}" if code else "")
            + (f": {message}" if message else "")
        )


class TuningTimeout(FinetuneError):
    """The job did not finish before the configured deadline; it keeps running and a rerun reattaches to it."""


MIGRATE_HINT = "mlflow run . -e migrate -P config=experiments/<migration>.yaml"


class TrainingClosed(ProviderError):
    """The provider no longer accepts new tuning jobs on this model (OpenAI's 403 `training_not_available` and its
    kin, or a dated `new_jobs: closed` entry); nothing was created, and the way forward is another provider."""

    def __init__(self, provider: str, base_model: str, said: str, *, status: int | None = None,
                 request_id: str | None = None):
        super().__init__(provider, f"{provider} does not accept new fine-tuning jobs on {base_model} ({said}); "
                         f"nothing was created. Move to a model on another provider: {MIGRATE_HINT}",
                         status=status, request_id=request_id)
        self.base_model = base_model
