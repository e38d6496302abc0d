#!/usr/bin/env bash
# Reproduces docs/results.md's figures and tables: runs every CPU twin in configs/cpu/ and plots it.
# Usage: bash docs/make_results.sh [OUT]   (default OUT=runs/cpu; about 15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
out=${1:-runs/cpu}
for config in configs/cpu/*.toml; do
    name=$(basename "$config" .toml)
    .venv/bin/prsgd run "$config" --out "$out/$name" --set progress=false
    .venv/bin/prsgd plot "$out/$name" --out "docs/figures/$name"
done
