#!/usr/bin/env bash
# Creates ./.venv (once) and installs prsgd into it. Idempotent: a second run only checks.
# torch==2.13.0 is installed first and explicitly, and every later install is constrained to it
# (constraints.txt), so that no dependency (Lightning, accelerate) ever resolves `torch` to a multi-GB CUDA build.
# EXTRAS (default: dev) picks the optional extras; scripts/test.sh asks for dev,lightning,accelerate.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
EXTRAS=${EXTRAS:-dev}
stamp=".venv/.prsgd-installed-${EXTRAS//,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$EXTRAS]"
    touch "$stamp"
fi

# Fashion-MNIST, the real image dataset available offline here (Debian's dataset-fashion-mnist): the demo, the CPU
# experiment configs and their tests read it from /usr/share/datasets/fashion-mnist.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
    else
        echo "note: Fashion-MNIST is missing; as root run: apt-get update && apt-get install -y dataset-fashion-mnist" >&2
    fi
fi
