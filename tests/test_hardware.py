"""Provider choice, hardware probes and silent-fallback detection, on the real onnxruntime.

This machine has the CPU build of onnxruntime, no NVIDIA driver and PoCL (a CPU OpenCL
runtime); the tests that need a GPU are marked `gpu` and skip elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from daemon.config import Settings, load_settings
from daemon.errors import ExitCode, ProviderError
from daemon.hardware import opencl, providers, sessions
from daemon.hardware.doctor import doctor_report, format_doctor
from daemon.hardware.nvml import GpuInfo, NvmlReader, NvmlReport, probe_nvml
from daemon.hardware.opencl import OpenClDevice, OpenClReport, probe_opencl
from daemon.hardware.openvino import OpenVinoProbe, OpenVinoSession, probe_openvino
from daemon.hardware.providers import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    ProviderChoice,
    choose_provider,
    probe_model_path,
)
from daemon.hardware.sessions import (
    Fallback,
    add_fallback_listener,
    create_session,
    provider_name,
)
from tests.support import wait_until

CUDA_IN_BUILD = CUDA_EP in ort.get_available_providers()
NVML_GPUS = probe_nvml().gpus

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not (CUDA_IN_BUILD and NVML_GPUS),
    reason="needs an NVIDIA GPU and onnxruntime-gpu",
)
needs_nvml_gpu = pytest.mark.skipif(not NVML_GPUS, reason="needs an NVIDIA GPU (NVML)")
cpu_build_only = pytest.mark.skipif(
    CUDA_IN_BUILD, reason="onnxruntime-gpu is installed here: CUDA is not dropped"
)


def run_probe_input(session: Any) -> list[Any]:
    feed = {session.get_inputs()[0].name: np.zeros(providers.PROBE_INPUT_SHAPE, np.float32)}
    result: list[Any] = session.run(None, feed)
    return result


@pytest.fixture
def no_nvml_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynvml as on a host without the driver: loading libnvidia-ml.so.1 fails."""
    import pynvml

    def missing(name: str, *args: Any, **kwargs: Any) -> Any:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "CDLL", missing)


@pytest.fixture(autouse=True)
def openvino_loses(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """OpenVINO as on a CPU without bf16 (where onnxruntime stays): these tests are about the
    onnxruntime providers; those about OpenVINO patch in what it finds. Returns the probe's
    calls."""
    calls: list[dict[str, Any]] = []

    def loses(precision: str = "auto", **kwargs: Any) -> OpenVinoProbe:
        calls.append({"precision": precision, **kwargs})
        return OpenVinoProbe(False, "stand-in: this CPU has no bf16 arithmetic", "2026.4")

    monkeypatch.setattr(providers, "probe_openvino", loses)
    return calls


@pytest.fixture
def no_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any hardware or provider probe fails the test."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("probe ran although the CPU was forced")

    monkeypatch.setattr(providers, "probe_nvml", forbidden)
    monkeypatch.setattr(providers, "probe_opencl", forbidden)
    monkeypatch.setattr(providers, "probe_provider", forbidden)


# --- FORCE_CPU / provider = cpu ---------------------------------------------------------------


def test_force_cpu_env_skips_every_probe(
    no_probes: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FORCE_CPU", "true")
    monkeypatch.setenv("OCR_DAEMON_OCR__PROVIDER", "cuda")  # FORCE_CPU wins even over this
    settings = load_settings()
    assert settings.force_cpu and settings.cpu_only

    choice = choose_provider(settings)

    assert choice.name == "cpu"
    assert choice.ort_providers == (CPU_EP,)
    assert "FORCE_CPU" in choice.reason
    assert choice.gpu_info is None and choice.fallbacks == ()


def test_provider_cpu_skips_every_probe(no_probes: None) -> None:
    choice = choose_provider(Settings(ocr={"provider": "cpu"}))
    assert choice.name == "cpu"
    assert "ocr.provider = cpu" in choice.reason


# --- NVML ---------------------------------------------------------------------------------------


def test_no_nvml_library_means_no_gpu_not_a_crash(no_nvml_library: None) -> None:
    report = probe_nvml()
    assert not report.available
    assert report.gpus == []
    assert report.error is not None and "no NVIDIA GPU" in report.error
    assert "libnvidia-ml" in report.error

    reader = NvmlReader()
    assert reader.read() == []
    assert reader.read() == []  # found out once, stays quiet
    reader.close()


def test_nvml_probe_on_this_host_never_raises() -> None:
    report = probe_nvml()
    assert report.available == bool(report.gpus)
    if not report.gpus:
        assert report.error


@gpu
@needs_nvml_gpu
def test_nvml_reads_real_gpus() -> None:
    report = probe_nvml()
    assert report.driver_version
    for g in report.gpus:
        assert g.name and g.uuid.startswith(("GPU-", "MIG-"))
        assert 0 < g.memory_used_bytes <= g.memory_total_bytes
        assert g.utilization_ratio is None or 0.0 <= g.utilization_ratio <= 1.0


# --- OpenCL -------------------------------------------------------------------------------------


def test_pocl_cpu_device_found_and_no_gpu_reported() -> None:
    # PoCL comes with the dev dependencies (pyopencl[pocl]); a missing one is a failure here.
    report = probe_opencl()
    assert report.available, report.error
    pocl = [d for d in report.devices if "Portable Computing Language" in d.platform]
    assert pocl, report.devices
    assert all(d.type == "cpu" for d in pocl)
    assert all(d.memory_bytes > 0 for d in pocl)
    assert not [d for d in report.gpus if d in pocl]


def test_cpu_choice_reports_opencl_cpu_but_no_gpu(no_nvml_library: None) -> None:
    opencl = probe_opencl()
    choice = choose_provider(Settings(), opencl=opencl, environ={})
    assert choice.name == "cpu"
    assert "no NVIDIA GPU" in choice.reason
    # PoCL's CPU device is no GPU; only a host that also has an OpenCL GPU reports one.
    assert ("OpenCL GPU" in choice.reason) == bool(opencl.gpus)
    assert ("opencl_only" in choice.fallbacks) == bool(opencl.gpus)


def test_opencl_only_gpu_is_reported_and_cpu_used(no_nvml_library: None) -> None:
    opencl = OpenClReport(
        True,
        [OpenClDevice("Intel(R) OpenCL Graphics", "Intel(R) Arc(TM) A380", "gpu", "Intel",
                      "OpenCL 3.0", 6 * 2**30)],
    )
    choice = choose_provider(Settings(), opencl=opencl, environ={})
    assert choice.name == "cpu"
    assert "Intel(R) Arc(TM) A380" in choice.reason
    assert "no OpenCL execution provider" in choice.reason
    assert "opencl_only" in choice.fallbacks


def test_opencl_probe_that_hangs_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opencl, "_OPENCL_SCRIPT", "import time; time.sleep(30)")
    report = probe_opencl(timeout=0.5)
    assert not report.available
    assert report.error is not None and "timed out" in report.error


def test_opencl_probe_that_crashes_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opencl, "_OPENCL_SCRIPT", "import os; os.abort()")
    report = probe_opencl()
    assert not report.available
    assert report.error is not None and "exited with status" in report.error


# --- explicit GPU providers ---------------------------------------------------------------------


@pytest.mark.skipif(CUDA_IN_BUILD, reason="onnxruntime-gpu is installed here")
@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_requested_gpu_provider_missing_is_a_startup_error(name: str) -> None:
    settings = Settings(ocr={"provider": name})
    with pytest.raises(ProviderError) as err:
        choose_provider(settings, environ={})
    message = str(err.value)
    assert f"ocr.provider = {name!r}" in message
    assert "not in this onnxruntime build" in message
    assert "onnxruntime-gpu" in message
    assert err.value.exit_code == ExitCode.PROVIDER


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_cuda_visible_devices_hiding_every_gpu_is_honoured(hidden: str) -> None:
    settings = Settings(ocr={"provider": "cuda"})
    with pytest.raises(ProviderError, match="CUDA_VISIBLE_DEVICES"):
        choose_provider(settings, environ={"CUDA_VISIBLE_DEVICES": hidden})

    auto = choose_provider(Settings(), environ={"CUDA_VISIBLE_DEVICES": hidden},
                           opencl=OpenClReport(False))
    assert auto.name == "cpu"
    assert "cuda_no_device" in auto.fallbacks and "tensorrt_no_device" in auto.fallbacks
    assert "CUDA_VISIBLE_DEVICES" in auto.reason


def test_device_id_beyond_visible_devices_is_an_error() -> None:
    settings = Settings(ocr={"provider": "cuda", "device_id": 1})
    with pytest.raises(ProviderError, match=r"no CUDA device 1 \(ocr.device_id\)"):
        choose_provider(settings, environ={"CUDA_VISIBLE_DEVICES": "0"})


def test_auto_on_cpu_build_without_gpu_is_no_fallback(no_nvml_library: None) -> None:
    if CUDA_IN_BUILD:
        pytest.skip("onnxruntime-gpu is installed here")
    choice = choose_provider(Settings(), environ={}, opencl=OpenClReport(False))
    assert choice.name == "cpu"
    assert choice.fallbacks == ()  # a CPU install on a CPU host is not a fallback


def test_gpu_present_but_cpu_build_counts_as_fallback() -> None:
    if CUDA_IN_BUILD:
        pytest.skip("onnxruntime-gpu is installed here")
    gpu_host = NvmlReport(True, "580.1", "13.0", [GpuInfo(
        0, "NVIDIA H100 80GB HBM3", "GPU-1", 80 * 2**30, 2**20, 0.0)])
    choice = choose_provider(Settings(), environ={}, nvml=gpu_host, opencl=OpenClReport(False))
    assert choice.name == "cpu"
    assert choice.fallbacks == ("tensorrt_not_in_build", "cuda_not_in_build")
    assert "NVIDIA H100 80GB HBM3" in choice.reason
    assert "onnxruntime-gpu" in choice.reason


def test_cuda_options_follow_settings() -> None:
    ocr = Settings(ocr={
        "device_id": 2, "cudnn_conv_algo_search": "DEFAULT", "gpu_mem_limit_bytes": 2**30,
    }).ocr
    spec = providers.ort_providers_for("cuda", ocr)
    assert spec[-1] == CPU_EP
    assert isinstance(spec[0], tuple)
    name, options = spec[0]
    assert name == CUDA_EP
    assert options == {
        "device_id": 2, "cudnn_conv_algo_search": "DEFAULT", "gpu_mem_limit": 2**30,
        "arena_extend_strategy": "kSameAsRequested",
    }
    assert "gpu_mem_limit" not in providers.cuda_options(Settings().ocr)

    trt = providers.ort_providers_for("tensorrt", ocr, Path("/cache"))
    assert [sessions._spec_name(s) for s in trt] == [TENSORRT_EP, CUDA_EP, CPU_EP]
    assert trt[0][1]["trt_engine_cache_path"] == "/cache"  # type: ignore[index]
    # a session of one shape bucket: TensorRT's profile is that shape, CUDA's options unchanged
    pinned = providers.with_shape_profile(trt, "x", (8, 48, 320, 3))
    assert {key: value for key, value in pinned[0][1].items()  # type: ignore[union-attr]
            if key.startswith("trt_profile")} == {
        "trt_profile_min_shapes": "x:8x48x320x3", "trt_profile_opt_shapes": "x:8x48x320x3",
        "trt_profile_max_shapes": "x:8x48x320x3"}
    assert pinned[1:] == trt[1:]
    assert "trt_profile_min_shapes" not in trt[0][1]  # type: ignore[operator]


# --- silent fallback ----------------------------------------------------------------------------


@cpu_build_only
def test_session_that_drops_cuda_is_detected_and_recorded() -> None:
    ocr = Settings().ocr
    choice = ProviderChoice("cuda", ort_providers=providers.ort_providers_for("cuda", ocr))
    direct: list[Fallback] = []
    heard: list[Fallback] = []
    remove = add_fallback_listener(heard.append)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said in the fallback, not warned on stderr
            session = create_session(probe_model_path(), choice, ocr, on_fallback=direct.append)
    finally:
        remove()

    assert session.get_providers() == [CPU_EP]
    assert provider_name(session) == "cpu"
    assert run_probe_input(session)[0].shape[0] == 1  # a usable CPU session
    assert direct == heard and len(direct) == 1
    event = direct[0]
    assert (event.wanted, event.got, event.reason) == ("cuda", "cpu", "cuda_dropped")
    assert event.model == providers.PROBE_MODEL
    assert CUDA_EP in event.detail and "not in this onnxruntime build" in event.detail

    create_session(probe_model_path(), choice, ocr)
    assert len(heard) == 1  # removed listeners hear nothing more


def test_sessions_are_built_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building sessions at once on one GPU has been reported to crash onnxruntime, so every
    build, from whatever thread (the warm-up's several), holds the process's build lock."""
    real = ort.InferenceSession
    held: list[bool] = []

    def building(*args: Any, **kwargs: Any) -> Any:
        held.append(sessions._building.locked())
        return real(*args, **kwargs)

    monkeypatch.setattr(sessions.ort, "InferenceSession", building)
    ocr = Settings().ocr
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: create_session(probe_model_path(), providers.CPU, ocr),
                              range(4)))
    assert [provider_name(session) for session in built] == ["cpu"] * 4
    assert held == [True] * 4


def test_a_batch_builds_its_shape_before_the_warm_up_builds_more() -> None:
    """One build at a time, but a batch waiting on its shape's session goes before the
    warm-up's next builds (each seconds on a GPU), whichever asked first."""
    lock = sessions.BuildLock()
    order: list[str] = []
    release = threading.Event()

    def build(name: str, background: bool, hold: threading.Event | None = None) -> None:
        with lock.background() if background else contextlib.nullcontext(), lock:
            order.append(name)
            if hold is not None:
                hold.wait(10)

    def waiting() -> int:
        return len(lock._free._waiters)  # type: ignore[attr-defined]

    threads = [threading.Thread(target=build, args=("warm-up 1", True, release))]
    threads[0].start()
    assert wait_until(lock.locked, 10)
    threads.append(threading.Thread(target=build, args=("warm-up 2", True)))
    threads[1].start()
    assert wait_until(lambda: waiting() == 1, 10)
    threads.append(threading.Thread(target=build, args=("batch", False)))
    threads[2].start()
    assert wait_until(lambda: waiting() == 2, 10)
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["warm-up 1", "batch", "warm-up 2"]


def test_cpu_session_is_no_fallback() -> None:
    heard: list[Fallback] = []
    remove = add_fallback_listener(heard.append)
    try:
        session = create_session(probe_model_path(), providers.CPU, Settings().ocr)
    finally:
        remove()
    assert session.get_providers() == [CPU_EP]
    assert heard == []


@cpu_build_only
def test_broken_model_raises_and_counts_no_fallback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    heard: list[Fallback] = []
    choice = ProviderChoice("cuda", ort_providers=(CUDA_EP, CPU_EP))
    with pytest.raises(Exception, match=r"(?i)protobuf|parse|load"):
        create_session(bad, choice, Settings().ocr, on_fallback=heard.append)
    assert heard == []


# --- doctor -------------------------------------------------------------------------------------


def test_doctor_report_is_json_and_readable() -> None:
    report = doctor_report(Settings())
    assert json.loads(json.dumps(report)) == report
    assert report["onnxruntime"]["version"] == ort.__version__
    assert CPU_EP in report["onnxruntime"]["available_providers"]
    assert report["provider"]["name"] in ("cpu", "cuda", "tensorrt")
    assert report["provider"]["reason"]

    text = format_doctor(report)
    assert f"onnxruntime {ort.__version__}" in text
    assert f"Execution provider: {report['provider']['name']}" in text
    for device in report["opencl"]["devices"]:
        assert device["device"] in text


def test_doctor_says_the_arithmetic_the_models_run_in() -> None:
    """fp16 only where a GPU runs the models: the CPU runs float32 whatever is configured."""
    report = doctor_report(Settings(ocr={"gpu_precision": "fp16", "provider": "cpu"}))
    assert report["provider"]["precision"] == "fp32"
    assert "arithmetic: fp32 (the CPU always)" in format_doctor(report)
    on_gpu = {**report, "provider": {**report["provider"], "name": "cuda", "precision": "fp16"}}
    assert "arithmetic: fp16 (ocr.gpu_precision)" in format_doctor(on_gpu)


def test_doctor_says_why_tensorrt_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT only with the libnvinfer major version onnxruntime's bridge links: doctor says
    which it is and why it is not used, or where its engines are cached when it is."""
    from daemon.hardware import doctor

    report = doctor_report(Settings())
    if TENSORRT_EP not in ort.get_available_providers():
        assert report["tensorrt"]["why"] == (
            "not used: this onnxruntime build has no TensorRT provider")
    assert f"TensorRT: {report['tensorrt']['why']}" in format_doctor(report)
    monkeypatch.setattr(doctor.ort, "get_available_providers",
                        lambda: [TENSORRT_EP, CUDA_EP, CPU_EP])
    monkeypatch.setattr(doctor, "linked_nvinfer", lambda bridge: "libnvinfer.so.10")
    monkeypatch.setattr(doctor, "tensorrt_libraries_loadable", lambda bridge: False)
    trt = doctor.tensorrt_report("cuda")
    assert trt["links"] == "libnvinfer.so.10" and not trt["used"]
    assert trt["why"] == ("not used: libnvinfer.so.10 (the major version onnxruntime's "
                          "TensorRT bridge links) is not installed or not on the library path")
    monkeypatch.setattr(doctor, "tensorrt_libraries_loadable", lambda bridge: True)
    used = doctor.tensorrt_report("tensorrt")
    assert used["used"] and used["engine_cache"].endswith("tensorrt")
    text = format_doctor({**report, "tensorrt": used})
    assert "TensorRT: used" in text and f"engine cache: {used['engine_cache']}" in text


@pytest.mark.skipif(CUDA_IN_BUILD, reason="onnxruntime-gpu is installed here")
def test_doctor_shows_provider_error_instead_of_raising() -> None:
    report = doctor_report(Settings(ocr={"provider": "cuda"}))
    assert report["provider"]["error"] is True
    assert report["provider"]["name"] is None
    assert "Execution provider: NONE" in format_doctor(report)


# --- on a GPU -------------------------------------------------------------------------------------


@gpu
@needs_cuda
def test_cuda_on_a_gpu_is_chosen_and_sessions_keep_it() -> None:
    settings = Settings(ocr={"provider": "cuda"})
    choice = choose_provider(settings)
    assert choice.name == "cuda"
    assert choice.gpu_info is not None and choice.gpu_info.startswith("CUDA: ")
    assert NVML_GPUS[0].name in choice.gpu_info
    heard: list[Fallback] = []
    session = create_session(probe_model_path(), choice, settings.ocr, on_fallback=heard.append)
    assert session.get_providers()[0] == CUDA_EP
    assert heard == []
    run_probe_input(session)


@gpu
@needs_cuda
def test_sessions_on_one_gpu_share_one_arena_and_run() -> None:
    """Per-shape sessions take their GPU memory from one arena for the device; asked for from
    four threads at once, as the warm-up asks."""
    settings = Settings(ocr={"provider": "cuda"})
    choice = choose_provider(settings)
    assert sessions.share_device_arena(settings.ocr)
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(
            lambda _: create_session(probe_model_path(), choice, settings.ocr, shared_arena=True),
            range(4)))
    for session in built:
        assert session.get_providers()[0] == CUDA_EP
        run_probe_input(session)


@cpu_build_only
def test_no_shared_gpu_arena_on_the_cpu_build_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sessions, "_shared_arenas", {})
    caplog.set_level("WARNING", logger="daemon.hardware.sessions")
    ocr = Settings().ocr
    assert sessions.share_device_arena(ocr) is False
    assert sessions.share_device_arena(ocr) is False
    said = [r.getMessage() for r in caplog.records if "memory arena" in r.getMessage()]
    assert len(said) == 1 and "each session keeps its own" in said[0]


# --- choice logic where this host cannot produce the case -------------------------------------


H100 = NvmlReport(True, "580.159.04", "13.0", [GpuInfo(
    0, "NVIDIA H100 80GB HBM3", "GPU-86ec9c67", 80 * 2**30, 2**30, 0.1)])


def test_cuda_chosen_when_tensorrt_lacks_its_libraries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """No onnxruntime-gpu here, so the probe itself is replaced: TensorRT dropped, CUDA works."""

    def probe(name: str, ocr: Any, cache_dir: Path | None = None) -> providers.ProbeResult:
        if name == "tensorrt":
            return providers.ProbeResult(False, "dropped", "libnvinfer.so.10 not found")
        return providers.ProbeResult(True, "", "CUDAExecutionProvider session ran")

    monkeypatch.setattr(providers, "probe_provider", probe)
    caplog.set_level("INFO", logger="daemon.hardware.providers")
    choice = choose_provider(Settings(), environ={}, nvml=H100, tensorrt_cache=tmp_path)

    assert choice.name == "cuda"
    assert choice.gpu_info == "CUDA: NVIDIA H100 80GB HBM3"
    assert choice.fallbacks == ()  # TensorRT is optional on top of CUDA: no fallback alert
    assert "TensorRT not used: libnvinfer.so.10 not found" in choice.reason
    assert [sessions._spec_name(s) for s in choice.ort_providers] == [CUDA_EP, CPU_EP]
    assert "GPU acceleration available gpu_info='CUDA: NVIDIA H100 80GB HBM3'" in caplog.text


def test_cuda_visible_devices_maps_device_id_to_the_nvml_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    two = NvmlReport(True, "580", "13.0", [
        GpuInfo(0, "NVIDIA A10", "GPU-aaaa", 1, 1, 0.0),
        GpuInfo(1, "NVIDIA H100 80GB HBM3", "GPU-bbbb", 1, 1, 0.0),
    ])
    monkeypatch.setattr(
        providers, "probe_provider",
        lambda name, ocr, cache_dir=None: providers.ProbeResult(name == "cuda", "", "ran"),
    )
    settings = Settings(ocr={"provider": "cuda"})
    by_index = choose_provider(settings, environ={"CUDA_VISIBLE_DEVICES": "1"}, nvml=two)
    by_uuid = choose_provider(settings, environ={"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}, nvml=two)
    unset = choose_provider(settings, environ={}, nvml=two)
    assert by_index.gpu_info == by_uuid.gpu_info == "CUDA: NVIDIA H100 80GB HBM3"
    assert unset.gpu_info == "CUDA: NVIDIA A10"


def test_tensorrt_cache_follows_systemd_then_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    assert providers.tensorrt_cache_dir() == Path("/xdg/ocr-daemon/tensorrt")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/ocr-daemon")
    assert providers.tensorrt_cache_dir() == Path("/var/cache/ocr-daemon/tensorrt")


def test_tensorrt_without_its_libraries_is_refused_without_building_a_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU build lists TensorRT whether or not libnvinfer is installed; the probe must say
    so in one line instead of letting onnxruntime fail (and print) a session build."""
    from daemon.config import OcrSettings

    monkeypatch.setattr(providers.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                 "CPUExecutionProvider"])
    monkeypatch.setattr(providers, "preload_gpu_libraries", lambda: None)

    def no_session(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("no session may be built without the TensorRT libraries")

    monkeypatch.setattr(providers.ort, "InferenceSession", no_session)
    assert not providers.tensorrt_libraries_loadable()  # this machine has no TensorRT
    result = providers.probe_provider("tensorrt", OcrSettings())
    assert (result.ok, result.code) == (False, "no_libraries")
    assert "libnvinfer" in result.detail


# --- several GPUs -------------------------------------------------------------------------------


def _gpus(n: int) -> list[GpuInfo]:
    return [GpuInfo(i, "NVIDIA H100 80GB HBM3", f"GPU-{i:04d}", 1, 1, 0.0) for i in range(n)]


@pytest.mark.parametrize(("gpus", "visible", "devices"), [
    ("all", None, (0, 1, 2, 3)),              # every NVIDIA GPU
    ("all", ["2", "3"], (0, 1)),              # CUDA_VISIBLE_DEVICES=2,3: CUDA numbers them 0, 1
    ("all", [], (0,)),                        # nothing visible: the probed device only
    ([1, 3], None, (1, 3)),
    ([1, 7], None, (1,)),                     # no device 7 here: left out, with a warning
    ([9], None, (0,)),                        # none of them here: the probed device
])
def test_one_engine_per_visible_gpu(gpus: Any, visible: list[str] | None,
                                    devices: tuple[int, ...]) -> None:
    ocr = Settings(ocr={"gpus": gpus}).ocr
    assert providers.gpu_devices(ocr, visible, _gpus(4)) == devices


def test_each_device_gets_its_own_provider_options() -> None:
    ocr = Settings().ocr
    choice = ProviderChoice("cuda", ort_providers=providers.ort_providers_for("cuda", ocr),
                            devices=(0, 1))
    on_one = choice.on_device(1, ocr)
    assert on_one.ort_providers[0][1]["device_id"] == 1  # type: ignore[index]
    assert choice.ort_providers[0][1]["device_id"] == 0  # type: ignore[index]
    assert (on_one.name, on_one.devices) == ("cuda", (0, 1))


def test_a_worker_per_batch_in_flight_on_each_gpu() -> None:
    from daemon.ocr.engines import worker_count
    from daemon.sizing import GPU_BATCHES_IN_FLIGHT

    settings = Settings()
    assert worker_count(settings, ProviderChoice("cuda", devices=(0, 1, 2))) == \
        3 * GPU_BATCHES_IN_FLIGHT
    assert worker_count(settings, ProviderChoice("cuda", devices=(0,))) == GPU_BATCHES_IN_FLIGHT


def test_tensorrt_is_taken_only_with_the_libnvinfer_its_bridge_links(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """`libnvinfer.so.11` was accepted where onnxruntime-gpu 1.31.1's TensorRT bridge links
    `.so.10`: a TensorRT it cannot call counted as present."""
    import ctypes

    from daemon.hardware import providers

    bridge = tmp_path / "libonnxruntime_providers_tensorrt.so"
    bridge.write_bytes(b"\x7fELF...\x00libnvinfer.so.10\x00libnvonnxparser.so.10\x00")
    assert providers.linked_nvinfer(bridge) == "libnvinfer.so.10"
    assert providers.linked_nvinfer(tmp_path / "absent.so") is None
    loaded: list[str] = []

    def cdll(name: str) -> object:
        loaded.append(name)
        if name != "libnvinfer.so.11":  # only TensorRT 11 is installed here
            raise OSError(f"{name}: cannot open shared object file")
        return object()

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert providers.tensorrt_libraries_loadable(bridge) is False
    assert loaded == ["libnvinfer.so.10"]


# --- OpenVINO ---------------------------------------------------------------------------------


class FakeCore:
    """OpenVINO's Core as a host's devices make it answer."""

    def __init__(self, devices: dict[str, list[str]]) -> None:
        self.devices = devices

    @property
    def available_devices(self) -> list[str]:
        return list(self.devices)

    def get_property(self, device: str, name: str) -> Any:
        if name == "OPTIMIZATION_CAPABILITIES":
            return self.devices[device]
        return f"{device} of a stand-in host"


BF16_CPU = FakeCore({"CPU": ["FP32", "BF16", "INT8"]})
PLAIN_CPU = FakeCore({"CPU": ["FP32", "INT8"]})
INTEL_GPU = FakeCore({"CPU": ["FP32"], "GPU": ["FP32", "FP16"]})


def test_openvino_is_taken_only_where_it_wins() -> None:
    """bf16 on the CPU (1.8-2.6x onnxruntime) or an Intel GPU; in fp32 on a CPU it gains
    nothing, so onnxruntime stays, unless ocr.provider = openvino forces it."""
    found = probe_openvino("auto", core=BF16_CPU)
    assert (found.usable, found.device, found.precision) == (True, "CPU", "bf16")
    assert "bf16" in found.reason
    plain = probe_openvino("auto", core=PLAIN_CPU)
    assert not plain.usable and "no bf16 arithmetic" in plain.reason
    assert not probe_openvino("fp32", core=BF16_CPU).usable  # ocr.cpu_precision = fp32
    assert "no bf16" in probe_openvino("bf16", core=PLAIN_CPU).reason
    gpu = probe_openvino("auto", core=INTEL_GPU)
    assert (gpu.usable, gpu.device) == (True, "GPU")
    assert not probe_openvino("auto", gpus=False, core=INTEL_GPU).usable  # FORCE_CPU
    forced = probe_openvino("auto", forced=True, core=PLAIN_CPU)
    assert (forced.usable, forced.device, forced.precision) == (True, "CPU", "f32")


def test_without_an_nvidia_gpu_the_daemon_takes_openvino_where_it_wins(
        monkeypatch: pytest.MonkeyPatch, no_nvml_library: None) -> None:
    if CUDA_IN_BUILD:
        pytest.skip("onnxruntime-gpu is installed here")
    calls: list[dict[str, Any]] = []

    def wins(precision: str = "auto", **kwargs: Any) -> OpenVinoProbe:
        calls.append(kwargs)
        return probe_openvino(precision, core=BF16_CPU, **kwargs)

    monkeypatch.setattr(providers, "probe_openvino", wins)
    choice = choose_provider(Settings(), environ={}, opencl=OpenClReport(False))
    assert (choice.name, choice.openvino_device, choice.precision) == ("openvino", "CPU", "bf16")
    assert choice.fallbacks == () and "bf16" in choice.reason
    # FORCE_CPU keeps every GPU out, an Intel one too, not the CPU's own best runtime
    forced = choose_provider(Settings(force_cpu=True), environ={})
    assert forced.name == "openvino" and calls[-1]["gpus"] is False
    # ocr.provider = cpu: onnxruntime on the CPU, OpenVINO not even asked
    asked = len(calls)
    assert choose_provider(Settings(ocr={"provider": "cpu"})).name == "cpu"
    assert len(calls) == asked
    report = doctor_report(Settings())
    assert report["provider"]["precision"] == "bf16"
    assert "arithmetic: bf16 (ocr.cpu_precision, on OpenVINO's CPU)" in format_doctor(report)


def test_where_openvino_loses_onnxruntime_stays_and_says_why(no_nvml_library: None) -> None:
    if CUDA_IN_BUILD:
        pytest.skip("onnxruntime-gpu is installed here")
    choice = choose_provider(Settings(), environ={}, opencl=OpenClReport(False))
    assert choice.name == "cpu"
    assert "OpenVINO not used: stand-in: this CPU has no bf16 arithmetic" in choice.reason


def test_openvino_forced_without_openvino_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "probe_openvino", lambda *a, **k: OpenVinoProbe(
        False, "OpenVINO not installed (ModuleNotFoundError: No module named 'openvino')"))
    with pytest.raises(ProviderError, match=r"ocr\.provider = 'openvino' was requested"):
        choose_provider(Settings(ocr={"provider": "openvino"}))


openvino_installed = pytest.mark.skipif(
    not probe_openvino().version, reason="needs OpenVINO (`make test` installs it on x86-64)")


@openvino_installed
def test_an_openvino_session_runs_the_edited_graphs_like_onnxruntime() -> None:
    """The recogniser as the daemon edits it (pixel input, on-device arg-max), compiled by
    OpenVINO in fp32: the same outputs, names and metadata as onnxruntime's session; calls from
    several threads at once each get their own answer."""
    from daemon.ocr.graphs import rec_model
    from daemon.ocr.host import rec_lut
    from daemon.ocr.models import load_rapidocr_config, resolve_model_paths

    ocr = Settings().ocr
    path = rec_model(resolve_model_paths(ocr, load_rapidocr_config(ocr)).rec, rec_lut())
    ov = OpenVinoSession(path, "CPU", "f32", threads=1, streams=2)
    cpu = sessions.create_session(path, providers.CPU, ocr)
    assert [i.name for i in ov.get_inputs()] == [i.name for i in cpu.get_inputs()]
    assert [o.name for o in ov.get_outputs()] == [o.name for o in cpu.get_outputs()]
    assert ov.get_modelmeta().custom_metadata_map == cpu.get_modelmeta().custom_metadata_map
    assert provider_name(ov) == "openvino"
    batches = [np.random.default_rng(n).integers(0, 256, (2, 48, 160 + 32 * n, 3)
                                                  ).astype(np.uint16) for n in range(4)]
    name = ov.get_inputs()[0].name
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: ov.run(None, {name: b}), batches))
    for batch, outputs in zip(batches, got, strict=True):
        want = cpu.run(None, {name: batch})
        assert [o.shape for o in outputs] == [w.shape for w in want]
        assert np.array_equal(outputs[0], want[0])  # arg-max: the characters read
        assert np.allclose(outputs[1], want[1], atol=1e-3)
