"""What a lent GPU machine needs and cannot fetch, built here as parts to carry one per device
call, and the plan of those calls. A script, not a test.

    python -m benchmarks gpu-bundle [--eval ../shared/ocr-eval] [--receipts 100] [--calls 5]

The machine (see the device tool's notes, KINDS.md: image 'cuda', Python 3.12, no network)
already has numpy, OpenCV, Pillow, onnx, prometheus-client, PyYAML, pytest, nvidia-ml-py and
the CUDA 13 / cuDNN 9 wheels onnxruntime-gpu loads (`IMAGE_HAS`), and only the CPU build of
onnxruntime. So the bundle is onnxruntime-gpu (its wheel repacked as tar.xz by Python's lzma:
255 MB -> ~204 MB), the daemon's dependencies the image lacks (cp312 manylinux wheels), and as
many SROIE receipts (images and their truth) as the calls leave room for. Everything goes in one
plain tar cut into parts of what one call may carry (64 MiB with the working tree); the last
part travels with the run itself. `python -m benchmarks gpu-check --bundle .gpu-bundle/parts`
unpacks it there with Python alone (tarfile, lzma, zipfile: no `xz`, no pip needed).

Prints the plan (stdout); writes .gpu-bundle/parts/{pNN,manifest.json} (git-ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, machine

OUT = REPO / ".gpu-bundle"
PARTS = OUT / "parts"
CACHE = OUT / "cache"
CARRY_LIMIT = 64 * 2**20  # what one device call carries, the working tree included
MARGIN = 2**20  # room for files the tree gains between building and carrying
# Distributions the device image holds (KINDS.md, "Python packages already there", read
# 2026-11-17), by their normalised names: not carried.
_IMAGE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy
numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
"""
IMAGE_HAS = frozenset(_IMAGE_LIST.split())
# RapidOCR asks for opencv-python; the image's opencv-python-headless is the same cv2 module
SAME_MODULE = {"opencv-python": "opencv-python-headless"}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    """The normalised distribution name of a wheel file."""
    return normalise(path.name.split("-")[0])


def carried(name: str) -> bool:
    """Whether a distribution must be carried: the image lacks it (and its module)."""
    name = normalise(name)
    return name not in IMAGE_HAS and SAME_MODULE.get(name) not in IMAGE_HAS


def download(requirements: list[str], folder: Path, *, deps: bool) -> None:
    """cp312 manylinux wheels (the machine's Python), resolved for that Python, not this one."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
               "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(folder)]
    if not deps:
        command.append("--no-deps")
    subprocess.run([*command, *requirements], check=True)


def daemon_requirements() -> list[str]:
    """The daemon's own dependencies (onnxruntime is not among them: the GPU build is)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def repack_xz(wheel: Path, target: Path) -> None:
    """A wheel's files as tar.xz (Python's lzma, preset 6): the GPU build's 255 MB wheel is
    deflate; xz makes it ~204 MB (-9e gains another 0.6%, at twice the time)."""
    with zipfile.ZipFile(wheel) as zf, lzma.open(target, "wb", preset=6) as xz, \
            tarfile.open(fileobj=xz, mode="w|") as tar:
        for info in zf.infolist():
            if info.is_dir():
                continue
            entry = tarfile.TarInfo(info.filename)
            entry.size = info.file_size
            entry.mode = 0o755 if info.filename.endswith(".so") or ".so." in info.filename \
                else 0o644
            with zf.open(info) as data:
                tar.addfile(entry, data)


def tree_bytes() -> int:
    """What a device call carries besides the carried paths: the tracked and untracked (not
    ignored) files of the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sum((REPO / name).stat().st_size for name in listed
               if name and (REPO / name).is_file())


def receipts_that_fit(images: list[Path], room: int) -> list[Path]:
    """The receipts, in name order, whose image and truth fit in `room` bytes (tar headers
    counted)."""
    chosen: list[Path] = []
    for image in images:
        box = image.parent.parent / "box" / f"{image.stem}.csv"
        size = _tar_size(image) + (_tar_size(box) if box.exists() else 0)
        if size > room:
            break
        room -= size
        chosen.append(image)
    return chosen


def _tar_size(path: Path) -> int:
    return 512 + -(-path.stat().st_size // 512) * 512


def write_parts(members: list[tuple[str, Path]], part_bytes: int, folder: Path
                ) -> list[dict[str, Any]]:
    """One plain tar of `members` (archive name, file), cut into parts of `part_bytes`:
    p00, p01, ... in `folder`. Returns each part's name, size and SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("p[0-9]*"):
        old.unlink()
    writer = PartWriter(folder, part_bytes)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for arcname, path in members:
            tar.add(path, arcname=arcname, recursive=False)
    writer.close()
    return writer.parts


class PartWriter(io.RawIOBase):
    """A write-only stream that cuts what it is given into files of at most `size` bytes."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, size
        self.parts: list[dict[str, Any]] = []
        self._file: Any = None
        self._hash: Any = None
        self._left = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            if self._left == 0:
                self._next()
            chunk = view[done:done + self._left]
            self._file.write(chunk)
            self._hash.update(chunk)
            self._left -= len(chunk)
            done += len(chunk)
        return done

    def _next(self) -> None:
        self._finish()
        name = f"p{len(self.parts):02d}"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 (closed by _finish)
        self._hash = hashlib.sha256()
        self._left = self.size
        self.parts.append({"name": name})

    def _finish(self) -> None:
        if self._file is not None:
            self.parts[-1].update(bytes=self._file.tell(), sha256=self._hash.hexdigest())
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._finish()
        super().close()


def plan(parts: list[dict[str, Any]]) -> list[str]:
    """The device calls, back to back (the machine is given back after ~30 s idle): one part
    each, the manifest with the first and the last, the last call the check itself."""
    rel = PARTS.relative_to(REPO)
    lines = []
    for n, part in enumerate(parts, 1):
        carry = [f"{rel}/{part['name']}"]
        if n in (1, len(parts)):
            carry.append(f"{rel}/manifest.json")
        if n < len(parts):
            command, limit = f"python3 -m benchmarks gpu-check --verify {rel}", 60
        else:
            command, limit = f"python3 -m benchmarks gpu-check --bundle {rel}", 600
        lines.append(f"call {n}: run(carry={json.dumps(carry)}, command={command!r}, "
                     f"timeout_s={limit})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=Path, default=REPO.parent / "shared" / "ocr-eval",
                        help="the evaluation set (its sroie/ receipts are carried)")
    parser.add_argument("--receipts", type=int, default=100,
                        help="at most this many receipts (fewer where the calls lack room)")
    parser.add_argument("--calls", type=int, default=5,
                        help="device calls in all, the run included (each carries one part)")
    args = parser.parse_args(argv)
    from daemon.hardware.builds import ORT_GPU_CUDA13

    wheels = CACHE / "whl"
    ort_wheel = next(CACHE.glob(f"onnxruntime_gpu-{ORT_GPU_CUDA13}-*.whl"), None)
    if ort_wheel is None:
        say(f"downloading onnxruntime-gpu {ORT_GPU_CUDA13} ...")
        download([f"onnxruntime-gpu=={ORT_GPU_CUDA13}"], CACHE, deps=False)
        ort_wheel = next(CACHE.glob(f"onnxruntime_gpu-{ORT_GPU_CUDA13}-*.whl"))
    ort_xz = CACHE / f"{ort_wheel.stem}.tar.xz"
    if not ort_xz.exists():
        say("repacking it as tar.xz (a few minutes) ...")
        repack_xz(ort_wheel, ort_xz.with_suffix(".tmp"))
        ort_xz.with_suffix(".tmp").rename(ort_xz)
    say("downloading the daemon's dependencies for Python 3.12 ...")
    download(daemon_requirements(), wheels, deps=True)
    take = sorted(w for w in wheels.glob("*.whl") if carried(wheel_name(w)))
    left = sorted({wheel_name(w) for w in wheels.glob("*.whl")} - {wheel_name(w) for w in take})

    tree = tree_bytes()
    part_bytes = CARRY_LIMIT - tree - MARGIN
    members = [("ort-gpu.tar.xz", ort_xz)] + [(f"whl/{w.name}", w) for w in take]
    fixed = sum(_tar_size(path) for _, path in members) + 10 * 1024  # the tar's end blocks
    receipts = sorted((args.eval / "sroie" / "img").glob("*.jpg"))[:args.receipts]
    chosen = receipts_that_fit(receipts, args.calls * part_bytes - fixed)
    for image in chosen:
        members.append((f"eval/sroie/img/{image.name}", image))
        box = image.parent.parent / "box" / f"{image.stem}.csv"
        if box.exists():
            members.append((f"eval/sroie/box/{box.name}", box))
    say(f"writing parts of {part_bytes / 2**20:.1f} MiB (a call carries {CARRY_LIMIT >> 20} "
        f"MiB, the working tree {tree / 2**20:.2f} MiB of it) ...")
    parts = write_parts(members, part_bytes, PARTS)
    manifest = {
        "parts": parts, "onnxruntime_gpu": ORT_GPU_CUDA13,
        "wheels": [w.name for w in take], "image_has": left, "receipts": len(chosen),
        "bytes": {"onnxruntime_gpu_xz": ort_xz.stat().st_size,
                  "wheels": sum(w.stat().st_size for w in take),
                  "receipts": sum(p.stat().st_size for _, p in members[1 + len(take):]),
                  "total": sum(p["bytes"] for p in parts)},
        "machine": machine(),
    }
    (PARTS / "manifest.json").write_text(json.dumps(manifest, indent=2))
    sizes = manifest["bytes"]
    print(f"bundle: {len(parts)} parts, {sizes['total'] / 2**20:.1f} MiB: onnxruntime-gpu "
          f"{ORT_GPU_CUDA13} as tar.xz {sizes['onnxruntime_gpu_xz'] / 2**20:.1f} MiB, "
          f"{len(take)} wheels {sizes['wheels'] / 2**20:.1f} MiB, {len(chosen)} receipts "
          f"{sizes['receipts'] / 2**20:.1f} MiB")
    print(f"not carried, the image has them: {', '.join(left)}")
    print("device calls, back to back (the machine goes back after ~30 s idle):")
    for line in plan(parts):
        print(f"  {line}")
    if len(parts) > args.calls:
        print(f"more parts than --calls {args.calls}: carry fewer receipts", file=sys.stderr)
        return 1
    shutil.rmtree(OUT / "work", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
