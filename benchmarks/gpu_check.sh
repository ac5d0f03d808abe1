#!/usr/bin/env bash
# GPU check, one prepared script: CUDA tests, the main example on the GPU, optimizer overhead on
# the GPU. Run from the repository root on a machine with a CUDA device:
#     bash benchmarks/gpu_check.sh
# It creates .venv with a CUDA build of torch unless one with CUDA is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  make setup TORCH_SPEC="${TORCH_SPEC:-torch>=2.2}"
fi
PY=.venv/bin/python
$PY - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
PYEOF
echo "== CUDA tests"
time $PY -m pytest -q -m cuda -p no:cacheprovider
echo "== main example on the GPU (d=16384, t=6)"
time $PY lightning_examples/sparse_regression.py --accelerator gpu --devices 1 --dim 16384 --logdir "${TMPDIR:-/tmp}/sde_optim_gpu_runs"
echo "== optimizer overhead on the GPU"
$PY benchmarks/optimizer_overhead.py --device cuda --reps 10
