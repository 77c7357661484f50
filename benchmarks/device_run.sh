#!/usr/bin/env bash
# What the GPU machine runs, in one call per stage; results and logs go to $OUT (or ./out).
#   bash benchmarks/device_run.sh verify  the whole GPU suite in one call (xdist over the GPU, one file per
#                                         worker), a pass/fail summary with date, GPU, torch and triton in
#                                         $OUT/gpu_tests.log (commit it as benchmarks/results/gpu_tests.log)
#   bash benchmarks/device_run.sh tests   GPU tests (pytest -m gpu), one process
#   bash benchmarks/device_run.sh cpu     the CPU suite on this machine's torch (graph snapshots on 2.11)
#   bash benchmarks/device_run.sh graphs  the graph-snapshot, post-grad pass and op tests alone on this machine's torch
#   bash benchmarks/device_run.sh swiglu  SwiGLU benchmark (--quick with a second argument "quick")
#   bash benchmarks/device_run.sh norm    gated RMSNorm benchmark (bench_norms.py --family gated, ~3.5 min budget)
#   bash benchmarks/device_run.sh norms   every norm spelling (gated, Llama and Gemma residual + RMSNorm) in one
#                                         call: bench_norms.py --quick, stops taking shapes at 390 s (~7 min in all)
#   bash benchmarks/device_run.sh e2e     end-to-end training step
#   bash benchmarks/device_run.sh host    host time per call at tiny sizes (layers, ops, compiled, profiles)
#   bash benchmarks/device_run.sh paired  small shapes, ours against Inductor, variants interleaved (~4 min)
#   bash benchmarks/device_run.sh kernels GPU time of every kernel in one forward+backward (profiler)
#   bash benchmarks/device_run.sh block   MLP-block benchmark with per-kernel profiles (--quick with "quick")
#   bash benchmarks/device_run.sh engine  the Gluon engine's GPU tests, then its benchmark against cuBLAS
#                                         (and cuBLAS + Inductor's elementwise kernels), with the probes
#                                         of shared/anchors when a copy sits in .anchors/ (~6 min)
#   bash benchmarks/device_run.sh epilogues  the engine's newest kernels in one call (~9.5 min): their GPU tests,
#                                         bench_engine.py --only epilogues (WIDTHS=), bench_moe.py --gemms-only
#                                         (grouped GEMMs and the down projection + combine), ncu of the dgated
#                                         kernels beside cuBLAS (ncu_dgated.py)
#   bash benchmarks/device_run.sh blocktests  GPU tests of the MLP-block ops alone
#   bash benchmarks/device_run.sh moe     expert-block benchmark (--quick with "quick")
#   bash benchmarks/device_run.sh rmsnorm residual + RMSNorm benchmark (bench_norms.py --family llama,gemma)
#   bash benchmarks/device_run.sh hf      training steps of transformers models (MODELS= to choose)
#   bash benchmarks/device_run.sh dist    FSDP2 and DDP on two GPUs (torchrun; DIST_BACKENDS to choose)
#   bash benchmarks/device_run.sh multigpu  the two-GPU tests
#   bash benchmarks/device_run.sh tunenorm gated-norm tile and workspace sweep (not part of "all")
#   bash benchmarks/device_run.sh tune    forward-kernel tile/schedule sweep (not part of "all")
#   bash benchmarks/device_run.sh plots   PNG plots from the SwiGLU and gated-norm JSON
#   bash benchmarks/device_run.sh bench   the benchmark suite alone: swiglu norm e2e kernels plots (~7 min)
#                                         (paired runs on its own: a call may last 10 minutes)
#   bash benchmarks/device_run.sh all     everything, in that order
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD
[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
quick=""; [ "${2:-}" = quick ] && quick="--quick"
case "${1:-all}" in
  all) stages="tests cpu host kernels swiglu norm e2e plots" ;;
  bench) stages="swiglu norm e2e kernels plots" ;;
  *) stages="$1" ;;
esac
for stage in $stages; do
  start=$(date +%s)
  case "$stage" in
    verify) workers=""; python3 -c "import xdist" 2>/dev/null && workers="-n ${VERIFY_WORKERS:-6} --dist loadfile"
            { echo "# GPU suite, $(date -u +%Y-%m-%d) on $(python3 -c 'import torch, triton; print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)')"
              echo "# python3 -m pytest -q -m 'gpu and not bigmem' tests $workers; then -m 'gpu and bigmem', one process"; } > "$OUT/gpu_tests.log"
            # the tests that hold tens of GiB run one at a time after the rest, which share the GPU
            timeout ${VERIFY_TIMEOUT:-420} python3 -m pytest -q -m "gpu and not bigmem" tests $workers -rfEs --tb=short \
              -p no:cacheprovider > /tmp/gpu_tests_full.log 2>&1; echo "pytest rc=$?" >> /tmp/gpu_tests_full.log
            if [ -z "${VERIFY_SKIP_BIGMEM:-}" ]; then
              timeout 240 python3 -m pytest -q -m "gpu and bigmem" tests -rfEs --tb=short -p no:cacheprovider \
                >> /tmp/gpu_tests_full.log 2>&1; echo "pytest (bigmem) rc=$?" >> /tmp/gpu_tests_full.log
            fi
            cp /tmp/gpu_tests_full.log "$OUT/gpu_tests_full.log"
            grep -E "^(FAILED|ERROR|SKIPPED|XFAIL|[0-9]+ (passed|failed)|pytest)" /tmp/gpu_tests_full.log >> "$OUT/gpu_tests.log"
            cat "$OUT/gpu_tests.log" | tail -60 ;;
    tests) python3 -m pytest -q -m gpu tests -rfs --tb=line -p no:logging -p no:cacheprovider 2>&1 | tee /tmp/gpu_tests.log | grep -v "^DEBUG" | tail -40 ;;
    cpu) python3 -m pytest -q -n 8 -m "not gpu" tests -p no:cacheprovider 2>&1 | tail -15 ;;
    graphs) python3 -m pytest -q -m "not gpu" tests/test_pass_snapshots.py tests/test_saved_preact.py \
              tests/test_graph_ops.py tests/test_swiglu_ops.py -p no:cacheprovider 2>&1 | tee "$OUT/graph_tests.log" | tail -15 ;;
    swiglu) python3 benchmarks/bench_swiglu.py $quick --json "$OUT/swiglu.json" --md "$OUT/swiglu.md" 2>/tmp/swiglu.err || tail -20 /tmp/swiglu.err ;;
    norm) python3 benchmarks/bench_norms.py --family gated $quick --budget-s 200 --json "$OUT/norm.json" --md "$OUT/norm.md" \
            2>/tmp/norm.err || tail -20 /tmp/norm.err ;;
    norms) python3 benchmarks/bench_norms.py --quick --budget-s 390 --json "$OUT/norms.json" --md "$OUT/norms.md" \
             2>/tmp/norms.err || tail -30 /tmp/norms.err ;;
    plots) python3 benchmarks/plot.py --swiglu "$OUT/swiglu.json" --norm "$OUT/norm.json" --block "$OUT/mlp_block.json" --out "$OUT" ;;
    paired) python3 benchmarks/paired.py --json "$OUT/paired.json" --md "$OUT/paired.md" 2>/tmp/paired.err || tail -20 /tmp/paired.err ;;
    host) python3 benchmarks/host_overhead.py 2>&1 | tee "$OUT/host_overhead.txt" | tail -120 ;;
    kernels) python3 benchmarks/kernel_times.py --out "$OUT/kernel_times.txt" 2>&1 | tail -60 ;;
    tunenorm) python3 benchmarks/tune_norm_bwd.py 2>&1 | tee "$OUT/tune_norm.txt" | tail -60 ;;
    tune) python3 benchmarks/tune_swiglu_fwd.py --json "$OUT/tune.json" 2>&1 | tail -80 ;;
    block) python3 benchmarks/bench_mlp_block.py $quick --json "$OUT/mlp_block.json" --md "$OUT/mlp_block.md" \
             --profile "$OUT/mlp_block_profile.txt" 2>/tmp/block.err || tail -30 /tmp/block.err ;;
    engine) timeout 240 python3 -m pytest -q -n 8 tests/test_gpu_engine.py -p no:cacheprovider 2>&1 | tail -15
            timeout 420 python3 benchmarks/bench_engine.py $quick --json "$OUT/engine.json" --md "$OUT/engine.md" --png "$OUT/engine.png" \
              2>&1 | grep -v "^|" | tail -70
            if [ -d .anchors ]; then (cd .anchors && timeout 60 python3 gluon_probe.py 2>&1 | tail -7 | tee "$OUT/anchor_gemm.txt"); fi ;;
    epilogues) # the engine's new kernels in one call: their GPU tests, the fused epilogues against cuBLAS and
               # Inductor's elementwise pass (fair baselines), the grouped GEMMs, and ncu of the dgated kernel
               timeout 140 python3 -m pytest -q -n 6 tests/test_gpu_engine.py -k "dgated or grouped_swiglu or grouped_matmul or test_gpu_grouped or test_gpu_pass" \
                 tests/test_gpu_grouped.py tests/test_gpu_pass.py -rfE --tb=short -p no:cacheprovider \
                 > "$OUT/epilogue_tests.log" 2>&1; echo "tests rc=$?"; tail -12 "$OUT/epilogue_tests.log"
               timeout 170 python3 benchmarks/bench_engine.py --only epilogues --quick \
                 --widths "${WIDTHS:-4096x14336,1024x3072}" --json "$OUT/epilogues.json" --md "$OUT/epilogues.md" \
                 2>&1 | grep -v "^|" | tail -20
               timeout 160 python3 benchmarks/bench_moe.py --gemms-only --quick --json "$OUT/moe_gemms.json" \
                 --md "$OUT/moe_gemms.md" 2>&1 | tail -20
               command -v ncu >/dev/null && timeout 90 ncu --clock-control none --nvtx --nvtx-include "profile/" \
                 --section SpeedOfLight --section MemoryWorkloadAnalysis python3 benchmarks/ncu_dgated.py \
                 > "$OUT/ncu_dgated.txt" 2>&1; grep -E "dgated_kernel|nvjet|gemm|Throughput|Duration|L2 Cache" \
                 "$OUT/ncu_dgated.txt" | head -40 ;;
    multigpu) NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 python3 -m pytest -q -m multigpu \
               tests/test_distributed.py -rfs --tb=line -p no:logging -p no:cacheprovider 2>&1 | tail -15 ;;
    rmsnorm) python3 benchmarks/bench_norms.py --family llama,gemma $quick --json "$OUT/rms_norm.json" --md "$OUT/rms_norm.md" \
               2>/tmp/rmsnorm.err || tail -30 /tmp/rmsnorm.err ;;
    moe) python3 benchmarks/bench_moe.py $quick --json "$OUT/moe.json" --md "$OUT/moe.md" 2>/tmp/moe.err || tail -30 /tmp/moe.err ;;
    hf) python3 benchmarks/bench_hf.py --models "${MODELS:-llama,qwen3,qwen3_0p6b,qwen3_moe}" --json "$OUT/hf${TAG:-}.json" \
          --md "$OUT/hf${TAG:-}.md" 2>&1 | grep -v Warning | tail -40 ;;
    dist) export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
          python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/distributed.py --mode fsdp2,ddp \
            --backends "${DIST_BACKENDS:-eager,inductor,glu_fusion}" --json "$OUT/dist.json" --md "$OUT/dist.md" \
            > "$OUT/dist.log" 2>&1; echo "dist rc=$?"; grep -v Warn "$OUT/dist.log" | tail -12 ;;
    blocktests) python3 -m pytest -q -m gpu tests/test_gpu_mlp_block.py -x -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_block_tests.log" | tail -25 ;;
    e2e) python3 benchmarks/bench_e2e.py --json "$OUT/e2e.json" --md "$OUT/e2e.md" 2>/tmp/e2e.err || tail -20 /tmp/e2e.err ;;
  esac
  echo "== stage $stage took $(( $(date +%s) - start )) s"
done
