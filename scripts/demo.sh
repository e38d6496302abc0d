#!/usr/bin/env bash
# The README's first command: set up .venv if needed, then run the demo experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m prsgd demo "$@"
