#!/usr/bin/env bash
# The CUDA path on this machine's GPU, in one command (fastllama was written where no GPU runs; README "Platforms"):
#   1. tests/test_cuda.py (compiled decode over CUDA-graph replays, int4 / int8 kernels, checkpoints, --devices,
#      NCCL tensor parallelism with 2+ GPUs, benchmark and eval) and tests/test_cuda_contracts.py;
#   2. a short benchmark of the default model: decode tok/s of bf16, int8 and int4 with --compile, batch 8, GB/s.
# Needs the test set-up of README.md (.venv with requirements-test.txt; on Linux pip's torch 2.13.0 is a CUDA build)
# and the default model (scripts/prepare.sh). Environment: PYTHON (default .venv/bin/python, else python3).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: torch sees no CUDA GPU here ($("$PYTHON" -c "import torch; print(torch.__version__)")); install a CUDA build of torch 2.13.0 and check nvidia-smi" >&2
  exit 1
fi
"$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, compute capability {p.major}.{p.minor}, {torch.cuda.device_count()} device(s); torch {torch.__version__}')"
HF_HUB_OFFLINE=1 "$PYTHON" -m pytest -q -rs tests/test_cuda.py tests/test_cuda_contracts.py
scripts/prepare.sh >/dev/null
"$PYTHON" benchmark.py --device cuda --precisions bf16,int8,int4 --batch_size 8 --runs 3 --no-startup
