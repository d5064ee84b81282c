#!/usr/bin/env bash
# One prepared GPU session for train.cuda_graph (issue 21; docs/speed.md, "CUDA graphs"):
#   1. throughput on CIFAR-10-LT (JPEG) ratio 100, ratios in one call: classic, default, nondet,
#      lazyloss, graph (train.cuda_graph=true), graph_lazy (+ loss read every 50 steps + nondet);
#   2. one 200-epoch CE run at the papers' protocol (configs/cifar10_lt_full/ce.yaml) with the graphs,
#      wall time including data preparation and evaluation (goal: <= 90 s on an H100 / H200);
#   3. eager against graphed steps for every configs/cifar10_lt config on the real graphs
#      (benchmarks/cuda_graph_check.py --device cuda: bitwise equal with train.deterministic=true?).
# Usage (from the repo root, with the data at $LONGTAIL_SHARED/data):
#   LONGTAIL_SHARED=../shared OUT=/tmp/graph_out benchmarks/cuda_graph_session.sh
# Writes $OUT/throughput_graph.json, $OUT/ce_full_graph/ (the run's metrics and eval), $OUT/walls.txt,
# $OUT/cuda_graph_check.json and $OUT/log.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
data="${LONGTAIL_SHARED:-../shared}/data/cifar10-jpeg.tar.gz"
runs=${RUNS:-/tmp/graph_runs}
mkdir -p "$OUT" "$runs"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  $PY benchmarks/throughput.py --device cuda --data cifar --epochs 2 --no-peaks \
    --pipelines classic,default,nondet,lazyloss,graph,graph_lazy --out "$OUT/throughput_graph.json"
  start=$(date +%s)
  $PY -m longtail train configs/cifar10_lt_full/ce.yaml data.root="$data" train.device=cuda train.cuda_graph=true \
    train.deterministic=false train.loss_check_every=100 --out "$runs/ce_full_graph" --no-progress | tail -n 3
  echo "ce_full_graph wall_seconds $(( $(date +%s) - start ))" | tee -a "$OUT/walls.txt"
  mkdir -p "$OUT/ce_full_graph" && cp "$runs"/ce_full_graph/{metrics.jsonl,eval.json,config.yaml} "$OUT/ce_full_graph/"
  timeout 300 $PY benchmarks/cuda_graph_check.py --device cuda --steps 4 --json "$OUT/cuda_graph_check.json"
} 2>&1 | tee "$OUT/log"
