"""Which onnxruntime build a host gets (`make setup`, the Dockerfile) and what doctor says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.hardware import builds
from daemon.hardware.builds import ORT_GPU_CUDA12, ORT_GPU_CUDA13, choose_build

REPO = Path(__file__).resolve().parents[1]
H200_HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
"""
OLD_HEADER = "| NVIDIA-SMI 535.183.01   Driver Version: 535.183.01   CUDA Version: 12.2     |"


def test_driver_cuda_version_from_nvidia_smi() -> None:
    assert builds.driver_cuda_version(H200_HEADER) == (13, 0)
    assert builds.driver_cuda_version(OLD_HEADER) == (12, 2)
    assert builds.driver_cuda_version("NVIDIA-SMI has failed: no devices were found") is None


@pytest.mark.parametrize(("cuda", "requirement", "gpu"), [
    ((13, 0), f"onnxruntime-gpu[cuda,cudnn]=={ORT_GPU_CUDA13}", True),
    ((13, 2), f"onnxruntime-gpu[cuda,cudnn]=={ORT_GPU_CUDA13}", True),
    ((12, 2), f"onnxruntime-gpu[cuda,cudnn]=={ORT_GPU_CUDA12}", True),
    ((11, 8), builds.CPU_REQUIREMENT, False),
    (None, builds.CPU_REQUIREMENT, False),
])
def test_the_build_follows_the_driver(cuda: tuple[int, int] | None, requirement: str,
                                      gpu: bool) -> None:
    choice = choose_build(cuda)
    assert (choice.requirement, choice.gpu) == (requirement, gpu)
    assert choice.reason


def test_the_makefile_asks_this_module_before_anything_is_installed() -> None:
    """`make` runs it with the system Python and no dependencies: standard library only."""
    script = ("import sys; sys.modules['numpy'] = None; sys.modules['onnxruntime'] = None; "
              "from daemon.hardware.builds import main; main(['--requirement'])")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60).stdout.strip()
    assert out in (builds.CPU_REQUIREMENT, choose_build((13, 0)).requirement,
                   choose_build((12, 0)).requirement)
    assert "daemon.hardware.builds --requirement" in (REPO / "Makefile").read_text()


def test_doctor_names_a_wrong_or_doubled_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builds, "installed_builds", lambda: {"onnxruntime": "1.32.0"})
    assert builds.build_report(None, probe=False)["problems"] == []
    cpu_on_gpu_host = builds.build_report((13, 0), probe=False)
    assert "CPU build is installed" in cpu_on_gpu_host["problems"][0]
    assert cpu_on_gpu_host["recommended"] == choose_build((13, 0)).requirement

    monkeypatch.setattr(builds, "installed_builds",
                        lambda: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    assert "both installed" in builds.build_report(None, probe=False)["problems"][0]
    monkeypatch.setattr(builds, "installed_builds", dict)
    assert "no onnxruntime installed" in builds.build_report(None, probe=False)["problems"][0]


def test_this_machine_has_exactly_one_build() -> None:
    assert len(builds.installed_builds()) == 1, builds.installed_builds()


def test_a_missing_onnxruntime_is_one_clear_line(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['onnxruntime'] = None\n"
              "from daemon.cli import main\n"
              "sys.exit(main(['doctor']))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(REPO),
                                                      "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 3, proc.stderr
    assert "onnxruntime is not installed" in proc.stderr and "pip install" in proc.stderr
