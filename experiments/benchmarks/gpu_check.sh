#!/usr/bin/env bash
# GPU readiness, one script (about 8 minutes on one H200-class GPU): the `gpu`-marked tests (every method's
# forward/backward on CUDA equal to the CPU's, the fused path on CUDA, DMP with NCCL on one GPU, export and
# load on CUDA, the kernel benchmark on CUDA), then the kernel benchmark at the issue's size against the
# GPU's gather ceiling. Without CUDA the tests are skipped with the reason and the script says so.
#     bash experiments/benchmarks/gpu_check.sh [python]
set -euo pipefail
PY=${1:-python}
cd "$(dirname "$0")/../.."
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; the gpu tests are skipped" >&2
fi
timeout 420 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  timeout 240 "$PY" -m experiments.benchmarks.bench_kernels --device cuda --rows 1000000 --rounds 3 --iters 5
fi
