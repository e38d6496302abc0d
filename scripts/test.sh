#!/usr/bin/env bash
# The README's second command (and CI's): set up .venv if needed, lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev,lightning,accelerate,tensorboard,ft bash scripts/bootstrap.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
