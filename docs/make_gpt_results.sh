#!/usr/bin/env bash
# Reproduces docs/results.md's AdamW tables (the byte-level GPT on the standard library's source): every config of
# configs/gpt/ with SEEDS seeds (default 3), identical and non-identical data,
#   gpt_n4:             N = 4, every local rule at I = 8 (equal rounds), DDP-AdamW as the reference;
#   gpt_n4_equal_bytes: N = 4, periods chosen so that every state policy sends what params-only sends at I = 8
#                       (Alg. 1 sends 3 model sizes per round: I = 24; first moment or every 2nd round: 2: I = 16);
#   gpt_n8:             N = 8, DDP, Alg. 1, params-only and DiLoCo at I = 8;
# then the summaries and tables (python -m prsgd results). Usage: bash docs/make_gpt_results.sh [OUT]
# (default OUT=runs/gpt; about 30 minutes on 2 cores).
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
    .venv/bin/prsgd run "configs/gpt/$config.toml" --out "$out/$experiment/$arm" --seeds "$seeds" "${sets[@]}"
}
run gpt_n4 ddp ddp_adamw
run gpt_n4 alg1 alg1_adamw
run gpt_n4 params_only params_only_adamw
run gpt_n4 diloco diloco
run gpt_n4 first_moment first_moment_adamw
run gpt_n4 state_period2 state_period_adamw
run gpt_n4_equal_bytes params_only params_only_adamw
run gpt_n4_equal_bytes diloco diloco
run gpt_n4_equal_bytes alg1_I24 alg1_adamw algorithm.period=24
run gpt_n4_equal_bytes first_moment_I16 first_moment_adamw algorithm.period=16
run gpt_n4_equal_bytes state_period2_I16 state_period_adamw algorithm.period=16
for arm in ddp:ddp_adamw alg1:alg1_adamw params_only:params_only_adamw diloco:diloco; do
    run gpt_n8 "${arm%%:*}" "${arm##*:}" training.workers=8
done
for experiment in gpt_n4 gpt_n4_equal_bytes gpt_n8; do
    .venv/bin/prsgd plot "$out/$experiment" --out "docs/figures/$experiment"
done
.venv/bin/python -m prsgd results "$out" --doc docs/results.md --summaries docs/results/runs.jsonl
