#!/usr/bin/env bash
# Regenerates docs/theory.md and docs/results.md from the current code, every table from runs made now:
#   theory sections 1-4 (python -m prsgd.experiments.theory_experiments, configs/theory/full.toml, about 20 min),
#   sections 5-7 with their raw per-seed runs in docs/theory/*_runs.jsonl (heterogeneity, scaling, rounds: about
#   15 min), the CPU twins (docs/make_results.sh, about 47 min) and the AdamW GPT tables (docs/make_gpt_results.sh,
#   about 40 min), then checks every table that has raw runs against them. About two hours on 2 cores.
# Usage: bash docs/make_docs.sh   (SEEDS=3 by default, as each script's own)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
seeds=${SEEDS:-3}
.venv/bin/python -m prsgd.experiments.theory_experiments --config configs/theory/full.toml --out docs --seeds "$seeds"
for section in heterogeneity scaling rounds; do
    .venv/bin/python -m prsgd.experiments."$section" --seeds "$seeds"
done
SEEDS=$seeds bash docs/make_results.sh
SEEDS=$seeds bash docs/make_gpt_results.sh
for section in heterogeneity scaling rounds; do
    .venv/bin/python -m prsgd.experiments."$section" --check
done
.venv/bin/python -m prsgd results --check --doc docs/results.md --summaries docs/results/runs.jsonl  # and gpt_runs.jsonl beside it
