#!/usr/bin/env bash
# One prepared GPU session for the runs the 2-core CPU cannot finish in a session (issues 5
# and 7): many 30-epoch CPU-budget runs side by side on one GPU, one process per run, one CPU
# thread each (the ResNet-32 loop is bound by kernel launches, docs/speed.md "On a GPU": 7
# concurrent ratio-100 runs on an H100 took 101-116 s of epochs each, 3,200-3,700 img/s per
# process and about 22,500 img/s in all). Configs, epochs and seeds are exactly the CPU
# benchmark budget's; only train.device=cuda and train.deterministic=false (cuDNN autotuning,
# 1.38x on one process, docs/speed.md) differ: these runs are not bitwise reproducible.
#   * the GHM-CWAP grid (configs/grids/ghm_cwap_cpu.yaml) at imbalance ratio 10, all 7 methods,
#     and its GHM-C cell at ratio 100;
#   * LCReg and its three ablations, stage 1 then stage 2 (configs/cifar10_lt/lcreg*.yaml).
#   SET=ratio100 instead: the grid's other methods at ratio 100 (CE, class-balanced, focal,
#   seesaw, URA, AURA) and MiSLAS (stage 1, stage 2), so that both ratios and the LCReg
#   comparison each have a row set from one machine.
# Usage, from the repo root, with the data at $LONGTAIL_SHARED/data:
#   LONGTAIL_SHARED=../shared OUT=/tmp/gpu_out [SET=ratio100] benchmarks/gpu_grid.sh
# Each finished run's small files (config, data, metrics, eval, predictions) are copied to
# $OUT/<run>/ as soon as it ends, so a session cut off early still returns what finished;
# at the end they are also packed into $OUT/runs.tgz (the device tool returns few files).
# On the device tool, wrap it in `timeout` and do not follow it with `pkill -f "longtail train"`
# on the same command line: the pattern matches that shell itself, which then dies before it
# can pack $OUT.
# DEVICE (default cuda) and EXTRA (overrides appended to every run) exist for a dry run on CPU.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
data="${LONGTAIL_SHARED:-../shared}/data/cifar10-jpeg.tar.gz"
runs=${RUNS:-/tmp/gpu_runs}
device=${DEVICE:-cuda}
read -r -a extra <<< "${EXTRA:-}"
mkdir -p "$OUT" "$runs"
log="$OUT/log"

train() {  # train NAME CONFIG [overrides...]: one run, then its small files to $OUT/NAME
  local name=$1 config=$2; shift 2
  local start; start=$(date +%s)
  $PY -m longtail train "$config" data.root="$data" train.device="$device" train.deterministic=false "$@" "${extra[@]}" \
    --out "$runs/$name" --no-progress > "$runs/$name.log" 2>&1
  local code=$?
  echo "$name exit $code wall_seconds $(( $(date +%s) - start ))" >> "$log"
  mkdir -p "$OUT/$name"
  cp "$runs/$name.log" "$OUT/$name/train.log"
  for f in config.yaml data.json metrics.jsonl eval.json predictions.npz; do
    [ -f "$runs/$name/$f" ] && cp "$runs/$name/$f" "$OUT/$name/"
  done
  return $code
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  nproc
} >> "$log" 2>&1
# decode the JPEGs once into the prepared store; the runs then memory-map it
$PY - "$data" >> "$log" 2>&1 <<'PYEOF'
import sys, time
from longtail.config import load_config
from longtail.data.build import build_data
t = time.time()
cfg = load_config("configs/cifar10_lt/ce.yaml", [f"data.root={sys.argv[1]}"])
build_data(cfg.data)
print(f"prepared store in {time.time() - t:.1f}s")
PYEOF

two_stage() {  # two_stage NAME: NAME_stage1 then NAME on its checkpoint
  train "${1}_stage1" "configs/cifar10_lt/${1}_stage1.yaml" \
  && train "$1" "configs/cifar10_lt/$1.yaml" method.params.stage1="$runs/${1}_stage1/checkpoints/last.pt"
}

if [ "${SET:-ratio10_lcreg}" = ratio100 ]; then
  for method in ce class_balanced focal seesaw ghm_cwap_ura ghm_cwap_aura; do
    train "ghm_cwap_r100_$method" "configs/cifar10_lt/$method.yaml" &
  done
  two_stage mislas &
else
  for method in ce class_balanced focal seesaw ghm_c ghm_cwap_ura ghm_cwap_aura; do
    train "ghm_cwap_r10_$method" "configs/cifar10_lt/$method.yaml" data.imbalance_ratio=10 &
  done
  train ghm_cwap_r100_ghm_c configs/cifar10_lt/ghm_c.yaml &
  for variant in lcreg lcreg_category_only lcreg_no_aug lcreg_no_recon; do
    two_stage "$variant" &
  done
fi
wait
echo "all done" >> "$log"
tar czf "$runs/packed.tgz" -C "$OUT" --exclude=runs.tgz . && mv "$runs/packed.tgz" "$OUT/runs.tgz"
