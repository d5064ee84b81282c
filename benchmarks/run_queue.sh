#!/usr/bin/env bash
# Run several benchmark configs one after the other on one core (one thread), each resumable.
#   benchmarks/run_queue.sh CORE CONFIG=RUN_DIR[@BRANCH_SOURCE] [...]
# Start it with nohup in the background; each run appends its wall time to RUN_DIR.log.
# Rerun the same command after an interruption: finished runs are skipped, a cut-off run resumes.
# @BRANCH_SOURCE (a checkpoint, e.g. runs/bench/ce/checkpoints/epoch24.pt) starts a new run from
# it with --branch-from (docs/training.md, branching); it waits until that file exists.
# EXTRA="train.precision=bf16 ..." adds overrides to every run, resumed ones included (resume refuses
# to change the saved config, so give the same EXTRA as at the start).
set -uo pipefail
core=$1; shift
for pair in "$@"; do
  config=${pair%%=*}; target=${pair#*=}
  run=${target%%@*}; source=""
  [ "$run" != "$target" ] && source=${target#*@}
  mkdir -p "$(dirname "$run")"
  if [ -f "$run/eval.json" ]; then echo "skip $run (finished)"; continue; fi
  read -r -a extra <<< "${EXTRA:-}"
  if [ -f "$run/checkpoints/last.pt" ]; then
    extra+=(--resume)  # with the same overrides: resume checks them against the saved config
  elif [ -n "$source" ]; then
    while [ ! -e "$source" ]; do sleep 60; done  # its source run is still training
    extra+=(--branch-from "$source")
  fi
  start=$(date +%s)
  OMP_NUM_THREADS=1 taskset -c "$core" longtail train "$config" --out "$run" --no-progress "${extra[@]}" >> "$run.log" 2>&1
  echo "exit $? wall_seconds $(( $(date +%s) - start ))" >> "$run.log"
done
