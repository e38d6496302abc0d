#!/usr/bin/env bash
# Reproduces docs/results.md's tables and figures from the current code: runs every CPU twin in configs/cpu/ with
# SEEDS seeds (default 3), plots each (mean over seeds, min-max band), writes one summary line per run to
# docs/results/runs.jsonl and rewrites the tables of docs/results.md from those lines (python -m prsgd.results).
# Usage: bash docs/make_results.sh [OUT]   (default OUT=runs/cpu; about 50 minutes on 2 cores with 3 seeds)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
out=${1:-runs/cpu}
seeds=${SEEDS:-3}
for config in configs/cpu/*.toml; do
    name=$(basename "$config" .toml)
    .venv/bin/prsgd run "$config" --out "$out/$name" --seeds "$seeds" --set progress=false
    .venv/bin/prsgd plot "$out/$name" --out "docs/figures/$name"
done
.venv/bin/python -m prsgd.results "$out" --doc docs/results.md --summaries docs/results/runs.jsonl
