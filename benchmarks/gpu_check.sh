#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, most important first, so that a short lease on a
# GPU machine ends with the numbers that matter:
#   1. PCR's step against CutMix-Seg's at the release's setting (resnet101s, output stride
#      8, 2 + 2 images, crops 513 and 769) in fp32 and bf16, side by side in one process
#      (--interleave), the ratio issue 15's target is about;
#   2. peak memory of the same steps, each method in its own process;
#   3. the foundation encoders: unimatch_v2, unimatch_v2+pcr and pcr on DINOv2-S and -B with
#      the DPT decoder at UniMatch V2's crop 518, bf16 with gradient checkpointing, each
#      method in its own process (step time and peak memory);
#   4. the prototype operations alone;
#   5. evaluation throughput and short end-to-end trainings in fp32/bf16/fp16.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [STAGES]   (from the repository root;
# STAGES: any of "ratios memory vit ops rest", default all five)
set -uo pipefail
out=${1:-gpu_results}
stages=${2:-"ratios memory vit ops rest"}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
run() { echo "### $*" | tee -a "$out/log.txt"; "$@" 2>&1 | tee -a "$out/log.txt"; }
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"
release=(--backbone resnet101s --output-stride 8 --batch 2 --loss ohem --device cuda)
voc=(--crop 513 --classes 21 --prototypes 4)
cityscapes=(--crop 769 --classes 19 --prototypes 3)
if [[ $stages == *ratios* ]]; then
  for precision in fp32 bf16; do
    run python3 benchmarks/step_time.py --interleave --methods cutmix_seg pcr "${release[@]}" \
        "${voc[@]}" --precision "$precision" --steps 30 --warmup 5 \
        --out "$out/ratio_513_$precision.json"
    run python3 benchmarks/step_time.py --interleave --methods cutmix_seg pcr "${release[@]}" \
        "${cityscapes[@]}" --precision "$precision" --steps 20 --warmup 5 \
        --out "$out/ratio_769_$precision.json"
  done
fi
if [[ $stages == *memory* ]]; then
  for precision in fp32 bf16; do
    run python3 benchmarks/step_time.py --methods supervised cutmix_seg pcr "${release[@]}" \
        "${voc[@]}" --precision "$precision" --steps 5 --warmup 2 \
        --out "$out/memory_513_$precision.json"
    run python3 benchmarks/step_time.py --methods cutmix_seg pcr "${release[@]}" \
        "${cityscapes[@]}" --precision "$precision" --steps 5 --warmup 2 \
        --out "$out/memory_769_$precision.json"
  done
fi
if [[ $stages == *vit* ]]; then
  # UniMatch V2's VOC step: 4 labelled + 4 unlabelled crops of 518 per GPU, 21 classes.
  for encoder in vit_small_patch14_dinov2 vit_base_patch14_dinov2; do
    run python3 benchmarks/step_time.py --model vit_dpt --backbone "$encoder" \
        --methods unimatch_v2 unimatch_v2+pcr pcr --crop 518 --batch 4 --classes 21 \
        --precision bf16 --checkpointing --device cuda --steps 10 --warmup 3 \
        --out "$out/vit_${encoder}_518_bf16.json"
  done
fi
if [[ $stages == *ops* ]]; then
  run python3 benchmarks/prototype_ops.py --device cuda --repeats 15
fi
if [[ $stages == *rest* ]]; then
  run python3 benchmarks/eval_throughput.py --backbone resnet101s --size 1024 2048 \
      --window 769 --stride 513 --batches 1 4 --device cuda
  data=$(mktemp -d)
  run python3 -m protoseg.cli data synthetic --out "$data/syn" --num-train 64 --num-val 16 \
      --labels 16
  for precision in fp32 bf16 fp16; do
    run timeout 300 python3 -m protoseg.cli train synthetic/pcr.yaml "data.root=$data/syn" \
        data.labeled_split=splits/16/labeled.txt data.unlabeled_split=splits/16/unlabeled.txt \
        "train.out_dir=$data/run_$precision" train.iterations=20 method.warmup_epochs=0.5 \
        train.device=cuda "train.precision=$precision" train.progress=false data.workers=2
  done
fi
