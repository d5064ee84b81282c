#!/usr/bin/env bash
# Run several benchmark configs one after the other on one core (one thread), each resumable.
#   benchmarks/run_queue.sh CORE CONFIG=RUN_DIR [CONFIG=RUN_DIR ...]
# Start it with nohup in the background; each run appends its wall time to RUN_DIR.log.
# Rerun the same command after an interruption: finished runs are skipped, a cut-off run resumes.
set -uo pipefail
core=$1; shift
for pair in "$@"; do
  config=${pair%%=*}; run=${pair#*=}
  mkdir -p "$(dirname "$run")"
  if [ -f "$run/eval.json" ]; then echo "skip $run (finished)"; continue; fi
  resume=()
  [ -f "$run/checkpoints/last.pt" ] && resume=(--resume)
  start=$(date +%s)
  OMP_NUM_THREADS=1 taskset -c "$core" longtail train "$config" --out "$run" --no-progress "${resume[@]}" >> "$run.log" 2>&1
  echo "exit $? wall_seconds $(( $(date +%s) - start ))" >> "$run.log"
done
