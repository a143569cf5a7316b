#!/usr/bin/env bash
# The GPU check, prepared once: at most 8 minutes on a machine with CUDA.
#   1. the demo zoo sweep on the GPU (fp16 autocast) against the CPU: prediction agreement >= 99%
#   2. Ray places one shard per GPU (checked from the sweep's placement)
#   3. diffusers generation in fp16 (tiny random pipeline): batched vs one prompt at a time
# On a machine without CUDA it says so and exits 0. Fashion-MNIST: the Debian package, or
# ZOO_AUDIT_FASHION_MNIST=DIR (carry the four IDX files to a machine without network).
#   bash benchmarks/gpu_check.sh            # uses .venv/bin/python when present
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
