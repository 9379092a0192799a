#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go: step time and memory of supervised,
# cutmix_seg and pcr for resnet101s at crop 513 and 769, prototype operations, evaluation
# throughput, and short end-to-end trainings in fp32/bf16/fp16 on CUDA.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR   (from the repository root)
set -uo pipefail
out=${1:-gpu_results}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
run() { echo "### $*"; "$@" 2>&1 | tee -a "$out/log.txt"; }
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
run python3 benchmarks/step_time.py --backbone resnet101s --output-stride 8 --crop 513 \
    --batch 2 --classes 21 --loss ohem --steps 10 --warmup 3 --device cuda --out "$out/step_513.json"
run python3 benchmarks/step_time.py --backbone resnet101s --output-stride 8 --crop 769 \
    --batch 2 --classes 19 --prototypes 3 --loss ohem --steps 10 --warmup 3 --device cuda \
    --out "$out/step_769.json"
run python3 benchmarks/step_time.py --backbone resnet101s --output-stride 8 --crop 513 \
    --batch 2 --classes 21 --loss ohem --precision bf16 --steps 10 --warmup 3 --device cuda \
    --out "$out/step_513_bf16.json"
run python3 benchmarks/prototype_ops.py --device cuda
run python3 benchmarks/eval_throughput.py --backbone resnet101s --size 1024 2048 --window 769 \
    --stride 513 --batches 1 4 --device cuda
data=$(mktemp -d)
run python3 -m protoseg.cli data synthetic --out "$data/syn" --num-train 64 --num-val 16 --labels 16
for precision in fp32 bf16 fp16; do
  run timeout 300 python3 -m protoseg.cli train synthetic/pcr.yaml "data.root=$data/syn" \
      data.labeled_split=splits/16/labeled.txt data.unlabeled_split=splits/16/unlabeled.txt \
      "train.out_dir=$data/run_$precision" train.iterations=20 method.warmup_epochs=0.5 \
      train.device=cuda "train.precision=$precision" train.progress=false data.workers=2
done
