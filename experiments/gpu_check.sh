#!/usr/bin/env bash
# The GPU checks, in one call, on a lent CUDA machine whose Python already has torch and triton
# (the device tool's image). Run from the repo root there:
#
#   bash experiments/gpu_check.sh
#
# It needs, carried with the call (both git-ignored, never committed):
#   .whl/site.tar.xz        the packages the image lacks (faiss-cpu, polars), unpacked wheels
#   .gpudata/datasets/      copies of ../shared/datasets/{ml-100k,amazon-toys} (licences: not in git)
# and writes logs and JSON under $OUT (default /tmp/gpu-out). In order of importance, each step
# under its own time limit, a failed step not stopping the next:
#   1. the machine and versions;
#   2. the Triton kernel compiled for the GPU (not interpreted) against the reference and the
#      torch path: the `gpu`-marked tests;
#   3. experiments/bench_attention.py --device cuda: Triton vs the torch path vs SDPA with a mask;
#   4. experiments/bench_roofline.py --device cuda on ml-100k and Toys: every stage on the GPU
#      (FAISS on the CPU) and the funnel's throughput with GESR / with the two-tower ESR;
#   5. the same on Toys at batch 1024, and the attention benchmark with its torch.compile rows.
# STEPS="bench_roofline bench_roofline_b1024" (say) runs only those steps (env always runs).
# Python runs with -P: the repo root's own cascade/ folder must not shadow the laid-out package.
set -u
STEPS=${STEPS:-kernel_tests bench_attention bench_roofline bench_roofline_b1024 bench_attention_compile}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
LOG="$OUT/gpu_check.log"
START=$(date +%s)

step() {  # step NAME SECONDS command...: run, log, report the exit status and the time taken
    local name=$1 limit=$2 t0 rc
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    t0=$(date +%s)
    echo "== $name (limit ${limit}s, at +$((t0 - START))s)" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "== $name: rc=$rc, $(($(date +%s) - t0))s" | tee -a "$LOG"
}

mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site || { echo "no .whl/site.tar.xz"; exit 2; }
# cascade laid out as pyproject.toml's package-dir maps it (the image has no network to install)
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r cascade /tmp/pkg/ \
    && for d in stages data kernels; do cp -r "$d" "/tmp/pkg/cascade/$d"; done
export PYTHONPATH=/tmp/pkg:/tmp/site:experiments
export CASCADE_DATASETS="$PWD/.gpudata/datasets" CASCADE_ML100K="$PWD/.gpudata/datasets/ml-100k"

echo "== env" | tee -a "$LOG"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc
  python3 -P - <<'PY'
import sys, torch, triton, faiss, polars, numpy
import cascade.kernels.target_attention  # noqa: F401  the package as laid out above
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "faiss", faiss.__version__, "polars", polars.__version__,
      "numpy", numpy.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
PY
} >>"$LOG" 2>&1
tail -n 4 "$LOG"

# each test process compiles and autotunes the kernel for its own shapes: on an H200, 43 of
# these tests took 68 s in two processes (the suite's default --dist loadfile keeps a file in
# one) after an earlier run had filled Triton's cache; --dist load spreads them over 16
step kernel_tests 240 python3 -P -m pytest -q -p no:cacheprovider -n 16 --dist load -m gpu \
    tests/test_target_attention.py tests/test_hstu.py

step bench_attention 150 python3 -P experiments/bench_attention.py --device cuda --no-compile \
    --out "$OUT/bench_attention_gpu.json"

step bench_roofline 200 python3 -P experiments/bench_roofline.py --device cuda --datasets ml100k,toys \
    --indexes --out "$OUT/bench_roofline_gpu.json"

step bench_roofline_b1024 120 python3 -P experiments/bench_roofline.py --device cuda --datasets toys \
    --indexes --batch-size 1024 --out "$OUT/bench_roofline_gpu_b1024.json"  # ml-100k: 943 requests

step bench_attention_compile 150 python3 -P experiments/bench_attention.py --device cuda \
    --out "$OUT/bench_attention_gpu_compile.json"

echo "== total $(($(date +%s) - START))s"
grep -E "^== |throughput with|funnel with|passed|failed|target [0-9]+x" "$LOG" | tail -n 60
