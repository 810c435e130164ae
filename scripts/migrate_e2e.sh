#!/usr/bin/env bash
# Issue 21's end-to-end migration test (OpenAI fake champion retiring in 20 days, candidates on local, a tiny
# transformers model and the Vertex fake). Left out of the default suite for its length; run it before a release.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -m migrate_e2e -n 0 -p no:randomly tests/test_migrate_e2e.py "$@"
