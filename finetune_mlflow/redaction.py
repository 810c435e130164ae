"""Secrets out of anything we write: a provider's job error can echo the API key it was called with, and that text
goes to run tags (`finetune.error_message`, `finetune.end_reason`), to stderr and to the log.

Two nets: the values of this process's secret-named environment variables (whatever their shape), and strings
shaped like the keys and tokens of the services we call (OpenAI, Google, AWS, Hugging Face, bearer tokens).
Pure apart from reading the environment; imported by `errors`, so it imports nothing of ours.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
MIN_SECRET_CHARS = 8  # shorter values ("1", "true") would mask ordinary words
KEY_SHAPED = re.compile("|".join((
    r"\bsk-[A-Za-z0-9_\-]{8,}",  # OpenAI (sk-..., sk-proj-...)
    r"\bsess-[A-Za-z0-9_\-]{8,}",
    r"\bAIza[0-9A-Za-z_\-]{20,}",  # Google API key
    r"\bya29\.[0-9A-Za-z_\-.]{10,}",  # Google OAuth access token
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key id
    r"\bhf_[A-Za-z0-9]{20,}",  # Hugging Face
    r"(?<=[Bb]earer )[A-Za-z0-9_\-.=+/]{12,}",
)))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables, longest first (a key containing another is masked whole)."""
    env = os.environ if environ is None else environ
    values = {value for name, value in env.items() if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """`text` with every known secret value and key-shaped string replaced by ***."""
    if not text:
        return text
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return KEY_SHAPED.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """A log handler filter: each record's final message redacted (its arguments may be provider text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True
