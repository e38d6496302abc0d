#!/usr/bin/env bash
# Reproduces docs/results.md's tables and figures from the current code: runs every CPU twin in configs/cpu/ with
# SEEDS seeds (default 3), plots each (mean over seeds, min-max band), writes one summary line per run to
# docs/results/runs.jsonl and rewrites the tables of docs/results.md from those lines (python -m prsgd results).
# Usage: bash docs/make_results.sh [OUT]   (default OUT=runs/cpu; about 47 minutes on 2 cores with 3 seeds)
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
# Figure 4(b)'s form: real processes under torchrun (1 and 2 fit 2 cores), loss against training wall-clock
for n in 1 2; do
    .venv/bin/torchrun --nproc-per-node "$n" --master-addr 127.0.0.1 --master-port $((29600 + n)) -m prsgd run \
        configs/cpu/linear_speedup.toml --engine distributed --sweep "training.workers=$n" --seeds "$seeds" \
        --out "$out/linear_speedup_processes" --set progress=false
done
.venv/bin/prsgd plot "$out/linear_speedup_processes" --out docs/figures/linear_speedup_processes --x wall_clock,joint_epoch
.venv/bin/python -m prsgd results "$out" --doc docs/results.md --summaries docs/results/runs.jsonl
