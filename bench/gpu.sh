#!/usr/bin/env bash
# GPU benchmark suite: NCCL sanity, input pipeline on the GPU, SemCKD/KD training throughput
# (eager, then torch.compile).
#   bash bench/gpu.sh            # results to $OUT if set, else bench/results/
# Each part runs under its own timeout (30 + 40 + 130 + 80 s), so the suite ends within about
# 4.8 minutes on one H100 even if a part hangs; every part prints its lines as it goes and
# rewrites its JSON after each configuration, so whatever finished before a timeout is kept.
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
echo "== machine"; date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" || exit 1
echo "== NCCL (1 process)";          timeout 30  "$PYTHON" bench/gpu.py nccl    || echo "nccl part failed or timed out ($?)"
echo "== input pipeline on the GPU"; timeout 40  "$PYTHON" bench/gpu.py loader  || echo "loader part failed or timed out ($?)"
echo "== training steps, eager";     timeout 130 "$PYTHON" bench/gpu.py train   --budget-s 110 || echo "train part failed or timed out ($?)"
echo "== training steps, compiled";  timeout 80  "$PYTHON" bench/gpu.py compile --budget-s 20  || echo "compile part failed or timed out ($?)"
echo "== done"; date -u
