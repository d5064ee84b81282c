#!/usr/bin/env bash
# One prepared GPU session for docs/speed.md (issue 10): the throughput benchmark on CUDA
# (CIFAR-10-LT (JPEG) ratio 100, data kept on the GPU), then CE at the CPU benchmark budget
# (configs/cifar10_lt/ce.yaml, 30 epochs) in fp32 and bf16, two seeds each, to measure the
# accuracy effect of bf16. Usage (from the repo root, with the data at $LONGTAIL_SHARED/data):
#   LONGTAIL_SHARED=../shared OUT=/tmp/cuda_out benchmarks/cuda_check.sh
# Writes $OUT/throughput_cuda.json, $OUT/packed_seeds_cuda*.json (several seeds as one packed network
# against one after another, docs/speed.md), $OUT/bf16_runs.json and $OUT/log.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
data="${LONGTAIL_SHARED:-../shared}/data/cifar10-jpeg.tar.gz"
runs=${RUNS:-/tmp/cuda_runs}
mkdir -p "$OUT" "$runs"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  $PY benchmarks/throughput.py --device cuda --data cifar --epochs 2 --pipelines classic,default,fastest,compile,bf16 --out "$OUT/throughput_cuda.json"
  $PY benchmarks/packed_seeds.py --device cuda --members 1,2,4,8,16 --out "$OUT/packed_seeds_cuda.json"
  $PY benchmarks/packed_seeds.py --device cuda --members 1,4,16 --precision bf16 --out "$OUT/packed_seeds_cuda_bf16.json"
  for seed in 0 1; do
    for prec in fp32 bf16; do
      start=$(date +%s)
      $PY -m longtail train configs/cifar10_lt/ce.yaml data.root="$data" train.device=cuda \
        train.precision=$prec train.seed=$seed --out "$runs/ce_${prec}_s$seed" --no-progress | tail -n 3
      echo "ce $prec seed $seed wall_seconds $(( $(date +%s) - start ))" | tee -a "$runs/walls.txt"
    done
  done
  $PY - "$runs" "$OUT/bf16_runs.json" <<'PYEOF'
import json, sys, pathlib
runs, out = pathlib.Path(sys.argv[1]), sys.argv[2]
walls = {" ".join(l.split()[1:4:2]): int(l.split()[-1]) for l in (runs / "walls.txt").read_text().splitlines()}
rows = {}
for d in sorted(runs.glob("ce_*")):
    if (d / "eval.json").is_file():
        rows[d.name] = {"eval": json.loads((d / "eval.json").read_text()),
                        "metrics": [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]}
json.dump({"walls": walls, "runs": rows}, open(out, "w"), indent=1)
print({k: v["eval"].get("top1") for k, v in rows.items()})
PYEOF
} 2>&1 | tee "$OUT/log"
