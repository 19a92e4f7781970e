#!/usr/bin/env bash
# The device check for a lent GPU machine: `python3 -m benchmarks gpu-check` (gpu_check.py says
# what it runs, in what order, under which caps). Build the bundle here first and follow the
# plan it prints: `python -m benchmarks gpu-bundle`.
#   benchmarks/gpu_check.sh --bundle .gpu-bundle/parts    (there, the last call of the plan)
#   benchmarks/gpu_check.sh --rehearse                    (here, on the CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks gpu-check "$@"
