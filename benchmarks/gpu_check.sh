#!/usr/bin/env bash
# The GPU check, prepared once: at most 9 minutes on a machine with CUDA.
#   1. the demo zoo sweep on the GPU (fp16 autocast) against the CPU: prediction agreement >= 99%
#   2. Ray places one shard per GPU (checked from the sweep's placement)
#   3. the learned generator: 2,000 training steps on CUDA vs the CPU per step, images/s
#   4. diffusers generation in fp16 (the tests' tiny random pipeline, `pytest -m gpu`): batched
#      images equal one-prompt-at-a-time ones, both timed
# On a machine without CUDA it says so and exits 0. Fashion-MNIST: the Debian package, or
# ZOO_AUDIT_FASHION_MNIST=DIR (carry the four IDX files to a machine without network).
#   bash benchmarks/gpu_check.sh            # uses .venv/bin/python when present
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
timeout 420 "$PY" benchmarks/gpu_check.py "$@"
sweep=$?
timeout 120 "$PY" -m pytest -q -s -m gpu -p no:cacheprovider tests/test_serve.py
gen=$?
# pytest exits 5 when it selects nothing: no gpu test there is a broken check, not a pass
echo "gpu_check.sh: sweep exit $sweep, diffusers (pytest -m gpu) exit $gen"
[ "$sweep" -eq 0 ] && [ "$gen" -eq 0 ]
