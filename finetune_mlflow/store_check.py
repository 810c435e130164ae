"""Is the tracking store usable at all? Checked once when an entry point starts, before any run exists, so a bad
MLFLOW_TRACKING_URI (an unknown scheme, `file://`, a missing database driver, a server or database nobody
answers at) is one `error:` line within seconds instead of a traceback after minutes of MLflow's own retries."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.parse
from typing import Callable

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.errors import ConfigError

NETWORK_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
CONNECT_TIMEOUT_S = 5.0
ATTEMPTS = 3  # a server that is restarting gets a few seconds
FIX = "check MLFLOW_TRACKING_URI (or --tracking-uri) and that the store is running"
# How long the first answer may take (MLflow retries a database it cannot reach for up to an hour on its own).
TIMEOUT_ENV = "FINETUNE_MLFLOW_STORE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0


def redacted(uri: str) -> str:
    """The URI without its password (database URIs carry one)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def network_address(uri: str) -> tuple[str, int] | None:
    """(host, port) a network store listens on; None for a local one (sqlite, a folder)."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme not in NETWORK_PORTS or not parts.hostname:
        return None
    try:
        return parts.hostname, parts.port or NETWORK_PORTS[scheme]
    except ValueError:  # a port that is not a number
        return None


def reach(address: tuple[str, int], sleep: Callable[[float], None] = time.sleep) -> str | None:
    """None once a TCP connection opens; else the last reason, after ATTEMPTS tries with a growing pause."""
    reason = ""
    for attempt in range(ATTEMPTS):
        try:
            socket.create_connection(address, timeout=CONNECT_TIMEOUT_S).close()
            return None
        except OSError as e:
            reason = str(e) or type(e).__name__
        if attempt + 1 < ATTEMPTS:
            sleep(2.0 ** attempt)
    return reason


def check_tracking_store() -> None:
    """ConfigError naming the store (password hidden) and why it cannot be used; nothing when it can."""
    uri = mlflow.get_tracking_uri()
    shown = redacted(uri)
    address = network_address(uri)
    if address is not None:
        reason = reach(address)
        if reason is not None:
            raise ConfigError(f"tracking store {shown} is unreachable ({reason}, {ATTEMPTS} tries); {FIX}")
    timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    outcome: list[BaseException | None] = []

    def first_call() -> None:
        try:
            MlflowClient().search_experiments(max_results=1)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - every store type fails its own way; all mean "cannot use it"
            outcome.append(e)

    noisy = logging.getLogger("mlflow.store.db.utils")  # one warning with a traceback per retry otherwise
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        # A daemon thread: a store that never answers (a database behind a silent port) cannot hold the exit.
        worker = threading.Thread(target=first_call, daemon=True, name="store-check")
        worker.start()
        worker.join(timeout)
    finally:
        noisy.setLevel(level)
    if not outcome:
        raise ConfigError(f"tracking store {shown} did not answer within {timeout:g} s ({TIMEOUT_ENV}); {FIX}")
    if outcome[0] is not None:
        error = outcome[0]
        detail = (str(error).strip().splitlines() or [""])[0].strip()[:400] or type(error).__name__
        raise ConfigError(f"tracking store {shown} cannot be used: {detail}; {FIX}") from error
