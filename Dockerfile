# syntax=docker/dockerfile:1.7
#
# ocr-daemon GPU image: CUDA 13 + cuDNN 9 runtime, Python 3.12, onnxruntime-gpu, models baked in.
#
#   docker build -t ocr-daemon .
#   docker run --gpus all --shm-size=1g -v inbox:/data/inbox -v db:/data/db -p 9464:9464 ocr-daemon
#   docker run --rm ocr-daemon doctor            # any subcommand: ENTRYPOINT is ocr-daemon
#   docker run -e FORCE_CPU=true ...             # same image without a GPU (CPU provider)
#
# Why this base: the onnxruntime-gpu wheels on PyPI (1.31.x) are built against CUDA 13 and
# cuDNN 9 (its [cuda,cudnn] extras resolve to nvidia-cuda-runtime 13.x and nvidia-cudnn-cu13
# 9.x). The build checks that every library the CUDA provider links resolves in this image
# (ldd, below), so a mismatched base fails here rather than as a silent CPU fallback at run time.
# TensorRT is not in this image: provider "auto" then settles on CUDA (logged and counted).

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG ORT_GPU_VERSION=1.31.1

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS build
ARG ORT_GPU_VERSION
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Versions are pinned by the base image tag (one Ubuntu release); pinning python3.12's exact
# Debian revision would break the build on each Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/ocr-daemon/venv
ENV PATH=/opt/ocr-daemon/venv/bin:$PATH
WORKDIR /src
COPY . .
# The daemon depends on no onnxruntime build itself (the CPU and GPU builds install the same
# module and must never be installed together: daemon/hardware/builds.py); the [gpu] extra
# brings onnxruntime-gpu alone, pinned here to the CUDA 13 build that builds.py names for a
# CUDA 13 driver. CUDA and cuDNN come from the base image, not from pip.
RUN pip install "/src[gpu]" "onnxruntime-gpu==${ORT_GPU_VERSION}"

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Non-root, fixed UID/GID so that bind-mounted host folders can be given to it (chown 10001).
RUN groupadd --system --gid 10001 ocr \
 && useradd --system --uid 10001 --gid ocr --home-dir /var/lib/ocr-daemon --create-home \
      --shell /usr/sbin/nologin ocr \
 && mkdir -p /data/inbox /data/db /etc/ocr-daemon \
 && chown ocr:ocr /data/inbox /data/db

COPY --from=build /opt/ocr-daemon/venv /opt/ocr-daemon/venv
COPY config.toml /etc/ocr-daemon/config.toml
COPY deploy/docker/selfcheck.py /opt/ocr-daemon/selfcheck.py

# Settings: /etc/ocr-daemon/config.toml (mount your own over it) < these ENV < `docker run -e`.
# The metrics server binds 0.0.0.0 here: inside a container 127.0.0.1 is reachable only from
# the container itself, and Prometheus scrapes from another container (compose network). Do not
# publish 9464 to the outside world unless you mean to.
ENV PATH=/opt/ocr-daemon/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OCR_DAEMON_CONFIG=/etc/ocr-daemon/config.toml \
    OCR_DAEMON_WATCH__PATH=/data/inbox \
    OCR_DAEMON_DATABASE__URL=sqlite:////data/db/ocr-daemon.db \
    OCR_DAEMON_METRICS__HOST=0.0.0.0 \
    OCR_DAEMON_LOG__FORMAT=json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_CACHE_PATH=/var/lib/ocr-daemon/.nv/ComputeCache \
    XDG_CACHE_HOME=/var/lib/ocr-daemon/.cache

# Build-time proof, with no network, that the image is complete:
#  - every shared library that onnxruntime's CUDA provider links resolves against this base
#    image (libcublas/libcublasLt/libcurand/libcudart .so.13), except libcuda.so.1, which the
#    NVIDIA container toolkit mounts from the host driver at run time;
#  - cuDNN 9, which the provider loads lazily (dlopen), is in the linker cache;
#  - the CUDA provider is compiled in (onnxruntime-gpu, not the CPU wheel, owns the module);
#  - RapidOCR's bundled det/rec/cls models are present and OCR a rendered line offline (the
#    models edited for the device are cached in the image as they are made, for the ocr user);
#  - the console script starts.
RUN --network=none set -eu; \
    cuda_ep="$(find /opt/ocr-daemon/venv -name 'libonnxruntime_providers_cuda.so' -print -quit)"; \
    test -n "$cuda_ep"; \
    deps="$(ldd "$cuda_ep")"; \
    missing="$(printf '%s\n' "$deps" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)"; \
    if [ -n "$missing" ]; then echo "not in the base image: $missing" >&2; exit 1; fi; \
    if ! ldconfig -p | grep 'libcudnn\.so\.9 ' >/dev/null; then echo "cuDNN 9 missing" >&2; exit 1; fi; \
    python /opt/ocr-daemon/selfcheck.py --require-cuda-provider; \
    ocr-daemon --version; \
    chown -R ocr:ocr /var/lib/ocr-daemon/.cache

USER 10001:10001
WORKDIR /var/lib/ocr-daemon
VOLUME ["/data/inbox", "/data/db"]
EXPOSE 9464

# `ocr-daemon check` asks the running daemon's /health (exit 0 = healthy). The start period
# covers model loading and warming up every shape bucket on the GPU.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["ocr-daemon", "check"]

ENTRYPOINT ["ocr-daemon"]
CMD ["run"]
