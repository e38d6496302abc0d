#!/usr/bin/env bash
# Creates ./.venv (once) and installs prsgd into it. Idempotent: a second run only checks.
# torch==2.13.0 is installed first and explicitly, so that no dependency ever resolves a bare `torch`
# to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
stamp=.venv/.prsgd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi
