#!/usr/bin/env bash
# Start (or resume) one benchmark run in the background, pinned to one core with one thread.
#   benchmarks/run_bg.sh CONFIG RUN_DIR CORE
# Writes RUN_DIR.log with the wall time; rerun the same command to resume a cut-off run.
set -euo pipefail
config=$1; run=$2; core=$3
mkdir -p "$(dirname "$run")"
resume=()
[ -f "$run/checkpoints/last.pt" ] && resume=(--resume)
nohup bash -c "start=\$(date +%s); OMP_NUM_THREADS=1 taskset -c $core longtail train $config --out $run --no-progress ${resume[*]}; \
echo \"exit \$? wall_seconds \$(( \$(date +%s) - start ))\"" >> "$run.log" 2>&1 &
echo "started $run on core $core (log: $run.log)"
