"""A team's MLflow on loopback, as the README's recipe builds it: a fresh PostgreSQL database, an S3-compatible
store (moto's server mode) and `mlflow server` proxying artifacts to it. Storage credentials exist only in the
tracking server's environment; `client_env` is what a teammate's shell holds. Used by the team-deployment test
and by `benchmarks/bench_team_server.py`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
BUCKET = "team-mlflow"
# moto accepts any key; these exist only in the S3 and tracking servers' environments.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
                  "AWS_DEFAULT_REGION": "us-east-1"}
STORAGE_VARIABLES = ("AWS_", "MLFLOW_S3_", "GOOGLE_APPLICATION_CREDENTIALS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_storage_credentials(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(STORAGE_VARIABLES)}


def client_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """A teammate's environment: the tracking URI and nothing that could reach the bucket directly."""
    env = {k: v for k, v in without_storage_credentials(dict(os.environ)).items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_TRACKING_URI": tracking_uri, "NO_PROXY": "127.0.0.1,localhost", **extra}


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards). Raises psycopg2.OperationalError when there is no
    server to talk to."""
    import psycopg2

    admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    admin.autocommit = True
    name = f"finetune_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def healthy(url: str) -> bool:
    """Whether the MLflow server at `url` answers its health check."""
    return _answers(f"{url}/health")


@contextlib.contextmanager
def background(command: list[str], *, env: dict[str, str], log: Path, ready_url: str,
               timeout: float = 120) -> Iterator[subprocess.Popen]:
    """Run a server in its own process group until the block ends; yields once `ready_url` answers 200."""
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(ready_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} did not come up:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the server and its workers
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is still shutting down, the leader included
        process.wait()


@contextlib.contextmanager
def s3_store(folder: Path) -> Iterator[str]:
    """moto's S3-compatible server on a free loopback port, with the bucket created; yields its endpoint URL."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {**without_storage_credentials(dict(os.environ)), **S3_CREDENTIALS}
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]]
    with background(command, env=env, log=folder / "s3.log", ready_url=endpoint):
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


def s3_client(endpoint: str):
    """A boto3 client for the test's own inspection of the bucket (credentials passed explicitly, not through the
    environment the clients inherit)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])


def bucket_keys(endpoint: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextlib.contextmanager
def tracking_server(database: str, s3_endpoint: str, folder: Path) -> Iterator[str]:
    """`mlflow server` on the database, proxying artifacts to `s3://<bucket>/mlflow`; yields its URL."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in without_storage_credentials(dict(os.environ)).items() if not k.startswith("MLFLOW_")}
    # No GenAI job runner (seven worker processes this project never uses): a faster start on a small machine.
    env.update(S3_CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3_endpoint, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{database}",
               "--artifacts-destination", f"s3://{BUCKET}/mlflow",
               "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    with background(command, env=env, log=folder / "tracking-server.log", ready_url=f"{url}/health"):
        yield url
