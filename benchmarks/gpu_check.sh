#!/usr/bin/env bash
# The GPU check, prepared once: at most 11 minutes on a machine with CUDA.
#   1. the demo zoo sweep on the GPU (fp16 autocast) against the CPU: prediction agreement >= 99%
#   2. Ray places one shard per GPU (checked from the sweep's placement)
#   3. the learned generator: 2,000 training steps on CUDA vs the CPU per step, images/s
#   4. diffusers generation in fp16 (the tests' tiny random pipeline, `pytest -m gpu`): batched
#      images equal one-prompt-at-a-time ones, both timed
#   5. head retraining in torch on CUDA (`pytest -m gpu tests/test_head.py`: equal to the CPU
#      fit) and its cost at ImageNet shape (bench_mitigation.py --only head: one fit by scipy,
#      torch on CUDA, torch on the CPU; a whole model's mitigate work)
# On a machine without CUDA it says so and exits 0. Fashion-MNIST: the Debian package, or
# ZOO_AUDIT_FASHION_MNIST=DIR (carry the four IDX files to a machine without network).
#   bash benchmarks/gpu_check.sh            # uses .venv/bin/python when present
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
timeout 420 "$PY" benchmarks/gpu_check.py "$@"
sweep=$?
timeout 150 "$PY" -m pytest -q -s -m gpu -p no:cacheprovider tests/test_serve.py tests/test_head.py
gen=$?
head=0  # at ImageNet shape on the CPU alone it takes minutes: measured where there is CUDA
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  timeout 120 "$PY" benchmarks/bench_mitigation.py --only head --repeats 2
  head=$?
fi
# pytest exits 5 when it selects nothing: no gpu test there is a broken check, not a pass
echo "gpu_check.sh: sweep exit $sweep, diffusers + head (pytest -m gpu) exit $gen, head bench exit $head"
[ "$sweep" -eq 0 ] && [ "$gen" -eq 0 ] && [ "$head" -eq 0 ]
