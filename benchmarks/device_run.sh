#!/usr/bin/env bash
# Everything the GPU machine runs in one call: GPU tests, then the benchmarks.
#   bash benchmarks/device_run.sh [tests|bench|quick|all]   (results and logs go to $OUT or ./out)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
what=${1:-all}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "$what" = tests ] || [ "$what" = all ] || [ "$what" = quick ]; then
  python3 -m pytest -q -m gpu tests -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/bench_swiglu.py --json "$OUT/swiglu.json" --md "$OUT/swiglu.md" 2>"$OUT/swiglu.err"
fi
if [ "$what" = quick ]; then
  python3 benchmarks/bench_swiglu.py --quick --json "$OUT/swiglu.json" --md "$OUT/swiglu.md" 2>"$OUT/swiglu.err"
fi
