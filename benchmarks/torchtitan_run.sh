#!/usr/bin/env bash
# torchtitan's Llama 3 debug model, FSDP2 over the GPUs with per-block torch.compile, trained twice
# from the same seed: plain compile, then GLU_FUSION=1 (the pass through the torch.backends entry
# point, torchtitan unchanged).  Loss, tokens/s, peak memory and rewrites per rank go to $OUT.
#
# Needs, in .whl/titan/ (git-ignored, carried to the GPU machine), for Python 3.12 and torch 2.11:
#   torchtitan-0.2.2, torchdata-0.11.0, datasets-4.4.1, dill-0.4.0, multiprocess-0.70.18,
#   fsspec-2025.10.0, tyro-1.0.17, docstring_parser-0.18.0, typeguard-4.6.1, shtab-1.13.0,
#   tomli-2.5.0 wheels, and .whl/titan/torchtitan_assets/tokenizer/{tokenizer.json,tokenizer_config.json}
#   (torchtitan's test tokenizer, from its repository's tests/assets/tokenizer).
# Settings (environment): NPROC=2 STEPS=20 FLAVOR=debugmodel SEQ=2048 BATCH=8 AC=selective
set -uo pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared hosts, in every process torchrun starts too.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# No network there: never let datasets or the hub try.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# A compile-cache hit skips the pass (and its log lines); both runs compile from scratch.
export TORCHINDUCTOR_FORCE_DISABLE_CACHES=1
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
NPROC=${NPROC:-2}; STEPS=${STEPS:-20}; FLAVOR=${FLAVOR:-debugmodel}
SEQ=${SEQ:-2048}; BATCH=${BATCH:-8}; AC=${AC:-selective}
WORK=${WORK:-/tmp/torchtitan_run}; mkdir -p "$WORK/c4_test"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/titan/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
# The GLU_FUSION entry point needs the package installed, not only importable.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
python3 - <<'EOF' || exit 1
import torch, triton, torchtitan, glu_fusion
from importlib.metadata import entry_points
eps = [e.name for e in entry_points(group="torch.backends")]
print("torch", torch.__version__, "triton", triton.__version__, "torchtitan", torchtitan.__version__,
      "GPUs", torch.cuda.device_count(), "entry points", eps)
assert "glu_fusion" in eps, "glu_fusion's torch.backends entry point is not installed"
EOF
python3 benchmarks/torchtitan_summary.py --make-corpus "$WORK/c4_test/data.json" || exit 1

run() {  # run NAME [VAR=VALUE ...]: one training run, console log to $OUT/torchtitan_NAME.log
  local name=$1; shift
  local start; start=$(date +%s)
  env "$@" python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" --tee 3 \
    -m torchtitan.train \
    --model.name llama3 --model.flavor "$FLAVOR" --model.hf_assets_path .whl/titan/torchtitan_assets/tokenizer \
    --training.dataset c4_test --training.dataset_path "$WORK/c4_test" \
    --training.steps "$STEPS" --training.seq_len "$SEQ" --training.local_batch_size "$BATCH" \
    --lr_scheduler.warmup_steps 2 --activation_checkpoint.mode "$AC" \
    --compile.enable --compile.components model,loss \
    --parallelism.data_parallel_shard_degree "$NPROC" \
    --metrics.log_freq 1 --metrics.disable_color_printing --debug.seed 42 \
    --job.dump_folder "$WORK/dump_$name" > "$OUT/torchtitan_$name.log" 2>&1
  local rc=$?
  echo "== torchtitan $name: exit $rc, $(( $(date +%s) - start )) s"
  grep -E "step: |rewrote |Error|error:" "$OUT/torchtitan_$name.log" | grep -E "default0|rank0|rewrote|rror" | tail -8
}
run plain GLU_FUSION=0
run glu_fusion GLU_FUSION=1
python3 benchmarks/torchtitan_summary.py --ranks "$NPROC" \
  --title "torchtitan 0.2.2 Llama 3 $FLAVOR, FSDP2 on $NPROC GPUs, per-block compile, AC $AC, seq $SEQ x batch $BATCH" \
  --log plain="$OUT/torchtitan_plain.log" --log glu_fusion="$OUT/torchtitan_glu_fusion.log" \
  --json "$OUT/torchtitan.json" --md "$OUT/torchtitan.md"
