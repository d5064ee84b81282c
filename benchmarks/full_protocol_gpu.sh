#!/usr/bin/env bash
# One prepared GPU session for issue 22: cells of the 200-epoch grid configs/grids/cifar10_lt_full.yaml
# packed on one GPU, brought back as kept cells (benchmarks/keep_cells.py, docs/bench.md "Keeping a grid
# across machines"), so that the next CPU session restores and tables them with the rest.
#   LONGTAIL_SHARED=../shared OUT=/tmp/gpu_out [CELLS=a,b] [JOBS=6] [DEADLINE=480] benchmarks/full_protocol_gpu.sh
# and, for the fp32 control grid (its three cells, kept in their own folder, no DLSA backbones):
#   GRID=configs/grids/cifar10_lt_full_fp32.yaml KEPT=benchmarks/artifacts/full_protocol_fp32 LAST_OF= CELLS=all \
#       LONGTAIL_SHARED=../shared OUT=/tmp/gpu_out_fp32 benchmarks/full_protocol_gpu.sh
# 1. restores the kept cells of $KEPT (default benchmarks/artifacts/full_protocol; none yet: skipped) into $RUNS
#    (default runs/grids/<the grid file's name>);
# 2. links the data archive to /work/shared/data/cifar10-jpeg.tar.gz, the path the kept cells' configs name
#    (data.root is part of a cell's config), unless it is there already;
# 3. runs CELLS (default: seeds 1 and 2 of CE, LDAM-DRW and balanced softmax at ratio 100; `all`: every cell of
#    the grid, in its order) with `longtail bench
#    --jobs JOBS` for at most DEADLINE seconds, then interrupts them (each resumes from its last epoch). The cells
#    keep the grid's configs: train.device auto (CUDA), deterministic, and the precision the grid's cells share
#    (bf16), so they are one grid with the CPU's cells;
# 4. keeps every cell (--last-of $LAST_OF, default ce,balanced_softmax: DLSA's backbones) and packs the kept folder into
#    $OUT/kept.tar.part-aa, -ab, ... (15 MiB parts: the device tool returns at most 8 files of 16 MiB), with
#    $OUT/log.
# Back on the CPU machine, with the parts in PARTS:
#   mkdir /tmp/gpu_kept && cat PARTS/kept.tar.part-* | tar xf - -C /tmp/gpu_kept
#   python benchmarks/keep_cells.py configs/grids/cifar10_lt_full.yaml --from /tmp/gpu_kept \
#       --to benchmarks/artifacts/full_protocol --last-of ce,balanced_softmax
# (for the fp32 grid: its grid file, --to benchmarks/artifacts/full_protocol_fp32, no --last-of).
# Run it a second time on the same warm machine to continue the cut-off cells (step 1 then skips the cells
# that are there). EXTRA (overrides for every cell) exists for a dry run on a CPU.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
grid=${GRID:-configs/grids/cifar10_lt_full.yaml}
runs=${RUNS:-runs/grids/$(basename "$grid" .yaml)}
kept=${KEPT:-benchmarks/artifacts/full_protocol}
last_of=${LAST_OF-ce,balanced_softmax}
cells=${CELLS:-ce/ratio100/seed1,ldam_drw/ratio100/seed1,balanced_softmax/ratio100/seed1,ce/ratio100/seed2,ldam_drw/ratio100/seed2,balanced_softmax/ratio100/seed2}
chosen=(--cell "$cells")
[ "$cells" = all ] && chosen=()
read -r -a extra <<< "${EXTRA:-}"
data=/work/shared/data/cifar10-jpeg.tar.gz
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  if [ ! -f "$data" ]; then
    mkdir -p "$(dirname "$data")" && ln -s "$(realpath "${LONGTAIL_SHARED:-../shared}/data/cifar10-jpeg.tar.gz")" "$data"
  fi
  [ -d "$kept" ] && $PY benchmarks/keep_cells.py "$grid" "${extra[@]}" --from "$runs" --to "$kept" --restore
  start=$(date +%s)
  # SIGINT: the grid stops its cells' processes, which stay resumable (docs/bench.md)
  timeout -s INT "${DEADLINE:-480}" $PY -m longtail bench "$grid" "${extra[@]}" --out "$runs" --jobs "${JOBS:-6}" \
    "${chosen[@]}" --no-progress
  echo "bench exit $? wall_seconds $(( $(date +%s) - start ))"
  rm -rf /tmp/kept_out && mkdir -p /tmp/kept_out
  $PY benchmarks/keep_cells.py "$grid" "${extra[@]}" --from "$runs" --to /tmp/kept_out --last-of "$last_of"
  tar cf - -C /tmp/kept_out . | split -b 15M - "$OUT/kept.tar.part-"
  tail -n 3 "$runs"/logs/*.log 2>/dev/null
} 2>&1 | tee "$OUT/log"
