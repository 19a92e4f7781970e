"""Which onnxruntime build this host should run, and which one it has.

`onnxruntime` (CPU) and `onnxruntime-gpu` install the same `onnxruntime` module: installed
side by side, whichever came last overwrites the other's files, and removing one deletes files
of both. So the daemon depends on neither; `make setup` installs the one this file names:

- an NVIDIA driver for CUDA 13 (driver 580 or later): `onnxruntime-gpu[cuda,cudnn]`, the
  newest build, with the CUDA and cuDNN libraries from pip (its own extras);
- a driver for CUDA 12: the last onnxruntime-gpu built for CUDA 12, with its extras;
- no NVIDIA driver (or an older one): the CPU build.

Standard library only: the Makefile runs `python -m daemon.hardware.builds` before anything
is installed. `doctor` shows the same facts for an installed daemon.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
from dataclasses import dataclass

CPU_REQUIREMENT = "onnxruntime>=1.20"
ORT_GPU_CUDA13 = "1.31.1"  # the Dockerfile's ORT_GPU_VERSION (CUDA 13 image) is this one
ORT_GPU_CUDA12 = "1.26.0"  # the last onnxruntime-gpu on PyPI built for CUDA 12
BUILD_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino",
                       "onnxruntime-directml", "onnxruntime-training")


@dataclass(frozen=True)
class BuildChoice:
    requirement: str  # what pip installs
    gpu: bool
    reason: str


def driver_cuda_version(nvidia_smi: str | None = None) -> tuple[int, int] | None:
    """The CUDA version the NVIDIA driver supports, from `nvidia-smi`'s header; None without
    a driver (no nvidia-smi, or it fails: no device, driver not loaded)."""
    if nvidia_smi is None:
        path = shutil.which("nvidia-smi")
        if path is None:
            return None
        try:
            nvidia_smi = subprocess.run([path], capture_output=True, text=True, timeout=20,
                                        check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi)
    return (int(found.group(1)), int(found.group(2))) if found else None


def choose_build(cuda: tuple[int, int] | None) -> BuildChoice:
    if cuda is None:
        return BuildChoice(CPU_REQUIREMENT, False, "no NVIDIA driver found")
    label = f"{cuda[0]}.{cuda[1]}"
    if cuda >= (13, 0):
        return BuildChoice(f"onnxruntime-gpu[cuda,cudnn]=={ORT_GPU_CUDA13}", True,
                           f"NVIDIA driver for CUDA {label}")
    if cuda >= (12, 0):
        return BuildChoice(f"onnxruntime-gpu[cuda,cudnn]=={ORT_GPU_CUDA12}", True,
                           f"NVIDIA driver for CUDA {label}: the last onnxruntime-gpu for CUDA 12")
    return BuildChoice(CPU_REQUIREMENT, False,
                       f"NVIDIA driver for CUDA {label} only; onnxruntime-gpu needs CUDA 12 or "
                       "later (update the driver): the CPU build")


def installed_builds() -> dict[str, str]:
    """The onnxruntime distributions installed here, with their versions."""
    found = {}
    for name in BUILD_DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def build_report(cuda: tuple[int, int] | None = None, *, probe: bool = True) -> dict[str, object]:
    """For `doctor`: what is installed, what this host should have, and what is wrong."""
    if probe and cuda is None:
        cuda = driver_cuda_version()
    choice = choose_build(cuda)
    installed = installed_builds()
    problems = []
    if len(installed) > 1:
        problems.append(f"{' and '.join(installed)} are both installed: they overwrite each "
                        "other's files; uninstall all of them and install one "
                        f"({choice.requirement})")
    elif not installed:
        problems.append(f"no onnxruntime installed: pip install '{choice.requirement}'")
    elif choice.gpu and "onnxruntime-gpu" not in installed:
        problems.append(f"the CPU build is installed on a host with an {choice.reason}: "
                        f"pip uninstall onnxruntime, then pip install '{choice.requirement}' "
                        "(make setup does both)")
    return {
        "installed": installed,
        "driver_cuda": None if cuda is None else f"{cuda[0]}.{cuda[1]}",
        "recommended": choice.requirement,
        "reason": choice.reason,
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.hardware.builds",
                                     description="The onnxruntime build for this host.")
    parser.add_argument("--requirement", action="store_true",
                        help="print only the pip requirement")
    args = parser.parse_args(argv)
    choice = choose_build(driver_cuda_version())
    print(choice.requirement if args.requirement else f"{choice.requirement}  ({choice.reason})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
