#!/usr/bin/env bash
# Build, on this machine, what a lent GPU machine needs and cannot fetch: onnxruntime-gpu (CUDA
# 13, cp312) and every wheel the daemon and its tests need there, as 60 MB parts to carry one
# per device call (see DEVELOPERS.md), plus the evaluation images. Then run there:
#   benchmarks/gpu_check.sh .gpu-bundle/parts .gpu-bundle/eval
# Usage: benchmarks/gpu_bundle.sh [EVAL_DIR]   (default ../shared/ocr-eval)
set -euo pipefail
cd "$(dirname "$0")/.."
eval_src=${1:-../shared/ocr-eval}
out=.gpu-bundle  # git-ignored
py=${PYTHON:-.venv/bin/python}
ort_gpu=$(PYTHONPATH=. $py -c 'from daemon.hardware.builds import ORT_GPU_CUDA13; print(ORT_GPU_CUDA13)')
rm -rf "$out/work" "$out/parts"
mkdir -p "$out/work/whl" "$out/parts" "$out/eval"

# cp312 manylinux wheels, no dependency resolution against this machine's Python
dl() { $py -m pip download -q --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform any -d "$out/work/whl" "$@"; }
dl --no-deps "onnxruntime-gpu==$ort_gpu"
# the daemon's own dependencies, read from pyproject.toml (onnxruntime is not among them: the
# GPU build above is the one), and what the GPU tests need
mapfile -t deps < <($py -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
dl "${deps[@]}" "nvidia-ml-py>=12" "pytest>=8" "pyyaml>=6"
rm -f "$out"/work/whl/onnxruntime-[0-9]*.whl "$out"/work/whl/torch-*.whl

# the GPU wheel repacked (xz) to carry fewer parts; gpu_check.sh unpacks it into /tmp/site
mkdir -p "$out/work/ort"
unzip -q "$out"/work/whl/onnxruntime_gpu-*.whl -d "$out/work/ort"
tar cJf "$out/work/ort-gpu.tar.xz" -C "$out/work/ort" .
rm -rf "$out/work/ort" "$out"/work/whl/onnxruntime_gpu-*.whl
# the GIL probe's sampler, for a GPU machine without a C compiler (it links no Python)
cp "$($py benchmarks/gil_probe.py build)" "$out/work/"
tar cf - -C "$out/work" ort-gpu.tar.xz whl $(cd "$out/work" && ls gil_probe-*.so) | split -b 60M - "$out/parts/p0"
rm -rf "$out/work"

# evaluation images: receipts and the tesseract pages with their ground truth
cp -r "$eval_src/sroie" "$eval_src/tesseract-testing" "$out/eval/"
du -sh "$out/parts" "$out/eval"
ls "$out/parts"
