"""The device check for a lent GPU (benchmarks/gpu_check.py) and its bundle (gpu_bundle.py):
the check rehearsed on the CPU, every stage writing its JSON with its figure, in order; the
bundle cut into parts, verified and unpacked with Python alone; the plan of the calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_bundle, gpu_check
from tests.support import REPO


def test_the_rehearsal_writes_each_stage_json_with_its_figure_in_order(tmp_path: Path) -> None:
    """The check as it runs on a GPU, on this machine's CPU with a handful of pages: a stage
    that broke (an import, an option, a figure renamed) would cost a lent GPU's minutes."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu-check", "--rehearse",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = sorted(p.name for p in out.glob("[0-9][0-9]-*.json"))
    assert written == [f"{n:02d}-{name}.json" for n, (name, _, _) in
                       enumerate(gpu_check.STAGES)]
    for name, cap, key in gpu_check.STAGES:
        result = json.loads(next(out.glob(f"*-{name}.json")).read_text())
        assert "error" not in result, result
        assert result[key] not in (None, {}, []), (name, key, result)
        assert result["seconds"] <= cap + 5, (name, result["seconds"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(proc.stdout)
    assert summary["missing_figures"] == [] and summary["rehearsal"] is True
    receipts = json.loads((out / "02-receipts.json").read_text())
    assert receipts["pages"] == 8 and receipts["bow"]["f1"] > 0.9  # 4 receipts, twice
    assert receipts["first_pass"]["pages"] == 4
    assert receipts["provider"]["name"] in ("cpu", "openvino") and receipts["provider"]["reason"]
    # no warm-up to wait for off an NVIDIA GPU: the stage went on at once
    assert receipts["warmup"]["state"] == "none (not an NVIDIA GPU)"
    assert receipts["warmup"]["waited_s"] < 5
    assert json.loads((out / "05-tests.json").read_text())["tests"]["tests"] > 0
    # the figures the targets are judged on, there; a rehearsal judges none
    assert summary["figures"]["x_naive_use_cuda"] and summary["figures"]["x_cpu_path"]
    assert summary["met"] == "not judged: a rehearsal on the CPU"


def _wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def _bundle(tmp_path: Path) -> Path:
    """A bundle as gpu-bundle writes one: a stand-in onnxruntime repacked as tar.xz, a wheel
    with a .data folder, two receipts with their truth; cut into parts of 4 KiB."""
    src = tmp_path / "src"
    src.mkdir()
    ort = _wheel(src / "onnxruntime_gpu-9.9-cp312-cp312-linux_x86_64.whl", {
        "onnxruntime/__init__.py": "__version__ = 'stand-in'\n" + "# padding\n" * 900,
        "onnxruntime/capi/libstandin.so.1": "not a library\n"})
    xz = src / "ort.tar.xz"
    gpu_bundle.repack_xz(ort, xz)
    dep = _wheel(src / "dep-1.0-py3-none-any.whl", {
        "dep/__init__.py": "VALUE = 7\n",
        "dep-1.0.data/purelib/dep_extra.py": "EXTRA = 8\n"})
    (src / "img").mkdir()
    (src / "box").mkdir()
    images = []
    for n in range(2):
        image = src / "img" / f"r{n}.jpg"
        image.write_bytes(os.urandom(3000))
        (src / "box" / f"r{n}.csv").write_text("1,1,2,1,2,2,1,2,TOTAL 9.99\n")
        images.append(image)
    chosen = gpu_bundle.receipts_that_fit(images, 10**6)
    assert chosen == images
    members = [("ort-gpu.tar.xz", xz), (f"whl/{dep.name}", dep)]
    for image in chosen:
        members += [(f"eval/sroie/img/{image.name}", image),
                    (f"eval/sroie/box/{image.stem}.csv", src / "box" / f"{image.stem}.csv")]
    parts_dir = tmp_path / "parts"
    parts = gpu_bundle.write_parts(members, 4096, parts_dir)
    assert len(parts) > 3 and all(p["bytes"] <= 4096 for p in parts)
    (parts_dir / "manifest.json").write_text(json.dumps({"parts": parts, "receipts": 2}))
    return parts_dir


def test_the_bundle_is_verified_and_unpacked_with_python_alone(tmp_path: Path) -> None:
    parts = _bundle(tmp_path)
    assert gpu_check.verify(parts)["missing"] == []
    # a part lost (the machine given back between calls) or cut short: said, not unpacked
    third = parts / "p02"
    whole = third.read_bytes()
    third.write_bytes(whole[:-1])
    assert gpu_check.verify(parts)["missing"] == ["p02"]
    with pytest.raises(RuntimeError, match=r"parts missing or damaged: \['p02'\]"):
        gpu_check.install(parts, tmp_path / "site", tmp_path / "work")
    third.write_bytes(whole)

    site, work = tmp_path / "site", tmp_path / "work"
    report = gpu_check.install(parts, site, work)
    assert report["wheels"] == 1 and report["receipts"] == 2
    probe = subprocess.run(
        [sys.executable, "-c", "import onnxruntime, dep, dep_extra; "
         "print(onnxruntime.__version__, dep.VALUE, dep_extra.EXTRA)"],
        env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["stand-in", "7", "8"]
    assert (site / "onnxruntime" / "capi" / "libstandin.so.1").stat().st_mode & 0o111
    assert sorted(p.name for p in (work / "eval" / "sroie" / "img").iterdir()) == [
        "r0.jpg", "r1.jpg"]
    assert (work / "eval" / "sroie" / "box" / "r1.csv").read_text().endswith("TOTAL 9.99\n")


def test_the_plan_carries_a_part_a_call_and_runs_the_check_with_the_last() -> None:
    parts = [{"name": f"p{n:02d}"} for n in range(5)]
    calls = gpu_bundle.plan(parts)
    assert len(calls) == 5
    assert "p00" in calls[0] and "manifest.json" in calls[0] and "--verify" in calls[0]
    assert all("--verify" in call and "timeout_s=60" in call for call in calls[:-1])
    assert "p04" in calls[-1] and "manifest.json" in calls[-1]
    assert "gpu-check --bundle .gpu-bundle/parts" in calls[-1] and "timeout_s=600" in calls[-1]


def test_the_bundle_carries_only_what_the_device_image_lacks() -> None:
    assert not gpu_bundle.carried("numpy") and not gpu_bundle.carried("Pillow")
    assert not gpu_bundle.carried("opencv_python")  # the image's headless OpenCV is cv2
    assert not gpu_bundle.carried("nvidia-cudnn-cu13")
    assert gpu_bundle.carried("rapidocr") and gpu_bundle.carried("SQLAlchemy")
    assert gpu_bundle.carried("onnxruntime-gpu")
