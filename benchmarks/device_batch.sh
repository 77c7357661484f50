#!/usr/bin/env bash
# Two stage chains side by side on a two-GPU machine, one per GPU, then every result packed into
# $OUT (a device call returns at most eight files):
#   bash benchmarks/device_batch.sh "<stages on GPU 0>" "<stages on GPU 1>" [quick] ["<stages on both>"]
# Stages as in device_run.sh; "hf:<models>" runs the transformers benchmark for those models; the
# last argument's stages (e.g. dist) run afterwards with both GPUs.
set -uo pipefail
export PYTHONUNBUFFERED=1 SKIP_INSTALL=1
FINAL=${OUT:-out}; mkdir -p "$FINAL"; export OUT=/tmp/batch_out; mkdir -p "$OUT"
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
chain() {  # gpu, stages...
  local gpu=$1; shift
  for stage in $1; do
    case "$stage" in
      hf:*) CUDA_VISIBLE_DEVICES=$gpu MODELS=${stage#hf:} TAG=_gpu$gpu bash benchmarks/device_run.sh hf ;;
      *) CUDA_VISIBLE_DEVICES=$gpu bash benchmarks/device_run.sh "$stage" "${QUICK:-}" ;;
    esac
  done
}
QUICK=${3:-}
(timeout "${LIMIT:-540}" bash -c "$(declare -f chain); QUICK=$QUICK; chain 0 '$1'" > "$OUT/gpu0.log" 2>&1) &
(timeout "${LIMIT:-540}" bash -c "$(declare -f chain); QUICK=$QUICK; chain 1 '$2'" > "$OUT/gpu1.log" 2>&1) &
wait
if [ -n "${4:-}" ]; then
  timeout "${BOTH_LIMIT:-240}" bash benchmarks/device_run.sh "$4" > "$OUT/both.log" 2>&1
  cp "$OUT/both.log" "$FINAL"/
fi
cp "$OUT"/gpu0.log "$OUT"/gpu1.log "$FINAL"/
tar czf "$FINAL/results.tgz" -C "$OUT" .
