#!/usr/bin/env bash
# One-shot GPU check on a lent GPU machine (see the issue notes): installs onnxruntime-gpu and
# the daemon's dependencies from a carried bundle (built here by benchmarks/gpu_bundle.sh:
# carry .gpu-bundle/parts/p0XX one per call, then .gpu-bundle/eval), then runs doctor, the GPU
# tests and the benchmarks, writing everything under $OUT (the daemons' own logs in
# $OUT/logs). The full set's time limits add up to 575 s, inside one device call (600 s); the
# host ceiling goes last, the first to give up.
# Usage: benchmarks/gpu_check.sh BUNDLE_PARTS_DIR EVAL_DIR
#   STAGES="warmup receipts" benchmarks/gpu_check.sh ...   runs only those stages (in order:
#   doctor tests warmup receipts a4 ceiling); RECEIPT_MODES picks bench.py's modes
#   (default c,e,d,a: the GPU daemon, the CPU daemon, naive CUDA, naive CPU; b, the engine
#   alone, would warm up a second time and is no target).
set -u
parts=${1:-/tmp/parts}; eval_dir=${2:-.evaldata}; out=${OUT:-/tmp/gpu-out}; mkdir -p "$out"
stages=${STAGES:-doctor tests warmup receipts a4 ceiling}
receipt_modes=${RECEIPT_MODES:-c,e,d,a}
export PYTHONUNBUFFERED=1
step() { echo "== $* ($(date +%T))"; }
want() { [[ " $stages " == *" $1 "* ]]; }

step install
if [ ! -d /tmp/site/onnxruntime ]; then
  mkdir -p /tmp/bundle /tmp/site
  cat "$parts"/p0* | tar xf - -C /tmp/bundle || exit 1
  tar xJf /tmp/bundle/ort-gpu.tar.xz -C /tmp/site || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/bundle/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# the GIL probe's sampler built where the bundle was, should this machine have no cc
if ! command -v cc > /dev/null && ! command -v gcc > /dev/null; then
  mkdir -p bench-out/gil-probe && cp /tmp/bundle/gil_probe-*.so bench-out/gil-probe/ 2>/dev/null
fi
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

if want doctor; then
  step doctor
  python3 -m daemon doctor 2>&1 | tee "$out/doctor.txt"
  python3 -m daemon doctor --json > "$out/doctor.json" 2>/dev/null
fi

if want tests; then
  step gpu tests
  # the tests marked gpu (the OpenCL ones want pyopencl and pocl, which the bundle leaves out);
  # two engines on one GPU, spread and failover (test_pipeline), last
  # -v: a test at a time, so that a run cut off by the timeout still says what passed
  timeout 60 python3 -m pytest -v -p no:cacheprovider -m gpu -rs tests/test_hardware.py \
    tests/test_metrics.py tests/test_graphs.py tests/test_batch_engine.py tests/test_pipeline.py \
    > "$out/tests.txt" 2>&1
  tail -12 "$out/tests.txt"
fi

if want warmup; then
  step shape changes: one session against a session per shape, and the engine warm-up
  # the engine's warm-up stops starting shapes after 75 s: shapes_warmed says how far it got;
  # then 25 s of batches bigger than the engine's (the data for the batch sizes)
  timeout 135 python3 -m benchmarks gpu-warmup --algos HEURISTIC --engine --warmup-seconds 75 \
    --sweep-seconds 25 > "$out/warmup.json" 2> "$out/warmup.log"
  grep -v "Fallback mode" "$out/warmup.log" | tail -3
fi

if want receipts; then
  step "receipts, modes $receipt_modes"
  # the daemons (c, e) take the 100 receipts once to warm up, then twice more at once, timed:
  # at 100 receipts/s one pass is a second, mostly filling and draining the pipeline; --gil:
  # how long each kind of the daemon's threads held the GIL a page meanwhile (gil_probe.py)
  timeout 220 python3 -m benchmarks bench --images "$eval_dir/sroie/img" --modes "$receipt_modes" --mode-seconds 25 \
    --rounds 3 --batch 8 --gil --log-dir "$out/logs" > "$out/bench-sroie.json" 2> "$out/bench-sroie.log"
  tail -3 "$out/bench-sroie.log"
fi

if want a4; then
  step 1000 rendered dense A4 pages through the daemon, GPU memory sampled every second
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -l 1 > "$out/gpumem.csv" &
  sampler=$!
  timeout 130 python3 -m benchmarks bench --render 1000 --a4 --modes c --batch 8 --timeout 100 \
    --log-dir "$out/logs" > "$out/bench-1000.json" 2> "$out/bench-1000.log"
  kill $sampler
  tail -2 "$out/bench-1000.log"
fi

if want ceiling; then
  step host ceiling on this machine cores, device replayed, the GIL sampled
  # 12 receipts recorded (on the CPU: most of the stage), replayed 16 times over (192
  # documents): 40 would pass 16 cores in well under a second, mostly filling and draining
  # the pipeline. The daemon's own queue.capacity (32), as it runs.
  timeout 30 python3 -m benchmarks host-ceiling --images "$eval_dir/sroie/img" --limit 12 \
    --copies 16 --cores 4,16 --gil --out /tmp/replay > "$out/host-ceiling.json" 2> "$out/host-ceiling.log"
  tail -2 "$out/host-ceiling.log"
fi
step done
