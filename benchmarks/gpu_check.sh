#!/usr/bin/env bash
# GPU check of image speed (speed_images.py), OT-CFM's pairing workers and the GPU-scale recipes: about 10 minutes
# on one GPU.
#   (a) per iteration, side by side: FFJORD's MNIST model (one block per scale, 400,323 parameters) with
#       FFJORD's engine (benchmarks/ffjord_multiscale_baseline.py) against fastcnf (direct back-propagation,
#       and direct with per-stage recomputation, in float32 and with a bfloat16 backward pass), batch 200 on
#       mnist-test-split, same weights, same batches;
#   (b)+(c) a short digits run (full-width 64-64-64 model, batch 200, N=100) with bits/dim curves for both
#       sides, then digits-fast until it reaches the baseline's bits/dim at N (time to quality);
#   one step of each of the 40 GPU-scale recipes on CUDA (tests/package/test_gpu_scale_recipes.py);
#   then the tests, which use CUDA where they can (tests/package/test_cuda.py).
# Needs a CUDA build of torch and `pip install -e .[test]` in $PYTHON's environment (the project's
# `make` set-up installs the CPU build). Results go to $OUT (default benchmarks/results/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT=${MNIST_ROOT:-../shared/data/mnist}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" || true
# (a) ~2 minutes
timeout 200 "$PY" benchmarks/speed_images.py --device cuda --root "$ROOT" --sides ffjord fastcnf \
    --fastcnf-set solver.gradient=auto --iterations 5 --batch-size 200 --json "$OUT/speed_images_a.json"
timeout 150 "$PY" benchmarks/speed_images.py --device cuda --root "$ROOT" \
    --sides ffjord fastcnf-recompute fastcnf-recompute-bf16 --iterations 4 --batch-size 200 \
    --json "$OUT/speed_images_a_recompute.json"
# (b) + (c) ~3 minutes
timeout 240 "$PY" benchmarks/speed_images.py --device cuda --iterations 0 --train-iterations 100 \
    --train-data digits --dims 64,64,64 --train-sides ffjord fastcnf --fastcnf-set solver.gradient=auto \
    --eval-every 25 --ttq --ttq-max-iterations 300 --json "$OUT/speed_images_bc.json"
# OT-CFM per step with the pairing in 1 / 2 worker threads on this machine's many cores (the 2-core CPU machine's
# floor is 1.46x of independent CFM; the <= 1.3x target needs free cores), on the CPU and with the step on the GPU,
# ~30 seconds
timeout 45 "$PY" benchmarks/ot_pairing_trainer.py --data 8gaussians --steps 100 --block 20 \
    --json "$OUT/ot_pairing_trainer_cpu.json" || echo "gpu_check: ot_pairing_trainer (cpu) failed"
timeout 45 "$PY" benchmarks/ot_pairing_trainer.py --data 8gaussians --steps 100 --block 20 --device cuda \
    --json "$OUT/ot_pairing_trainer_cuda.json" || echo "gpu_check: ot_pairing_trainer (cuda) failed"
# the 40 recipes whose data is not on the CPU machine: one step each on the GPU, on files of their formats, ~2 minutes
FASTCNF_TEST_DEVICE=cuda timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m "slow or not slow" \
    tests/package/test_gpu_scale_recipes.py || echo "gpu_check: GPU-scale recipe steps failed"
# the suite (CUDA-aware tests included), ~1.5 minutes
timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/package/test_cuda.py tests/ode tests/cnf
echo "gpu_check: results in $OUT"
