#!/usr/bin/env bash
# The papers' protocol (issue 22) in one command: the 200-epoch grid configs/grids/cifar10_lt_full.yaml
# packed with `longtail bench --jobs`, then DLSA (seed 002; `longtail dlsa`, not a training run) on every
# finished CE and balanced-softmax cell, then the HTML report of the seed-0 ratio-100 cells.
#   JOBS=12 OUT=runs/grids/cifar10_lt_full benchmarks/full_protocol.sh [extra overrides ...]
# JOBS: cells at once (default: one per GPU x 6 on a GPU machine, one per core on a CPU). Rerun the
# same command after any interruption: finished cells and DLSA results are skipped, cut-off cells
# resume from their last checkpoint. Extra arguments are overrides for every cell (e.g.
# data.root=/data/cifar10-jpeg.tar.gz, or train.epochs=2 for a dry run with --out elsewhere).
set -euo pipefail
grid=configs/grids/cifar10_lt_full.yaml
out=${OUT:-runs/grids/cifar10_lt_full}
if [ -z "${JOBS:-}" ]; then
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
  if [ "$gpus" -gt 0 ]; then JOBS=$((gpus * 6)); else JOBS=$(nproc); fi
fi
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
echo "$(date -u +%FT%TZ) grid $grid -> $out, $JOBS jobs, device $device, CPU: $(python -c 'from longtail.dist import cpu_model; print(cpu_model())')"
status=0
longtail bench "$grid" "$@" --out "$out" --jobs "$JOBS" --no-progress || status=$?
for method in ce balanced_softmax; do
  for cell in "$out/$method"/ratio*/seed*; do
    [ -f "$cell/eval.json" ] || continue
    [ -f "$cell/dlsa/dlsa.json" ] && continue
    start=$(date +%s)
    longtail dlsa "$cell" --out "$cell/dlsa" --device "$device" > "$cell/dlsa.log" 2>&1 || status=$?
    echo "dlsa $cell wall_seconds $(( $(date +%s) - start ))" >> "$out/dlsa_walls.log"
  done
done
seed0=()
for cell in "$out"/*/ratio100/seed0; do [ -f "$cell/eval.json" ] && seed0+=("$cell"); done
[ ${#seed0[@]} -gt 0 ] && longtail report "${seed0[@]}" --out "$out/report_ratio100_seed0.html" \
  --title "CIFAR-10-LT (JPEG) ratio 100, seed 0, 200 epochs"
exit $status
