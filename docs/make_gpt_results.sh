#!/usr/bin/env bash
# Reproduces docs/results.md's AdamW tables (the byte-level GPT on the standard library's source): configs/gpt/
# with SEEDS seeds (default 3), identical and non-identical data,
#   gpt_n4: N = 4, DDP-AdamW (the reference) and every state policy at I = 8 (equal rounds), and the policies that
#           send more per round at the period where they send what params-only sends at I = 8 (equal bytes: Alg. 1
#           sends 3 model sizes per round, so I = 24; first moment only or the state every 2nd round: 2, so I = 16);
#   gpt_n8: N = 8, DDP, Alg. 1, params-only and DiLoCo at I = 8;
# then plots, the summaries (docs/results/gpt_runs.jsonl, beside the CPU twins' runs.jsonl) and the tables
# (python -m prsgd results). Runs already finished are kept (--resume). Usage: bash docs/make_gpt_results.sh [OUT]
# (default OUT=runs/gpt; about 40 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
out=${1:-runs/gpt}
seeds=${SEEDS:-3}
run() {  # experiment arm config [KEY=VALUE ...]
    local experiment=$1 arm=$2 config=$3
    shift 3
    local sets=(--set progress=false)
    for kv in "$@"; do sets+=(--set "$kv"); done
    .venv/bin/prsgd run "configs/gpt/$config.toml" --out "$out/$experiment/$arm" --seeds "$seeds" --resume "${sets[@]}"
}
run gpt_n4 ddp ddp_adamw
run gpt_n4 alg1 alg1_adamw
run gpt_n4 params_only params_only_adamw
run gpt_n4 diloco diloco
run gpt_n4 first_moment first_moment_adamw
run gpt_n4 state_period2 state_period_adamw
run gpt_n4 alg1_I24 alg1_adamw algorithm.period=24
run gpt_n4 first_moment_I16 first_moment_adamw algorithm.period=16
run gpt_n4 state_period2_I16 state_period_adamw algorithm.period=16
for arm in ddp:ddp_adamw alg1:alg1_adamw params_only:params_only_adamw diloco:diloco; do
    run gpt_n8 "${arm%%:*}" "${arm##*:}" training.workers=8
done
for experiment in gpt_n4 gpt_n8; do
    .venv/bin/prsgd plot "$out/$experiment" --out "docs/figures/$experiment"
done
.venv/bin/python -m prsgd results "$out" --doc docs/results.md --summaries docs/results/gpt_runs.jsonl
