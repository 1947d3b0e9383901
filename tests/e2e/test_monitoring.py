"""The monitoring stack against a real ftpsd. The Grafana dashboard queries only metrics that
/metrics exports, and the kustomize component renders. A real Prometheus (Debian's package)
scrapes ftpsd and remote-writes to a real InfluxDB 1.x (Debian's package). Both run on loopback,
with configurations generated per test, and are stopped by their PID."""

import io
import json
import os
import re
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest

try:
    import yaml
except ImportError:  # test_monitoring_component_renders fails with the fix
    yaml = None

from conftest import REPO, free_port, require_tool, wait_until
from ops_helpers import http_get, parse_metrics, with_admin

MONITORING = REPO / "k8s" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"

# What the dashboard must show, by the metric behind it.
REQUIRED_PANELS = {
    "sessions": "ftpsd_sessions_active",
    "throughput": "ftpsd_transfer_bytes_total",
    "logins": "ftpsd_logins_total",
    "failures by reason": "ftpsd_data_connection_failures_total",
    "passive pool usage": "ftpsd_passive_ports_in_use",
    "passive pool size": "ftpsd_passive_ports_pool_size",
    "certificate expiry": "ftpsd_certificate_expiry_timestamp_seconds",
}


def dashboard_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return queries


def metric_names(query):
    return set(re.findall(r"\b(ftpsd_[a-z_]+|ftp_[a-z_]+)\b", query))


def upload(server, name, size):
    client = server.ftps()
    client.storbinary(f"STOR {name}", io.BytesIO(os.urandom(size)))
    client.retrbinary(f"RETR {name}", lambda chunk: None)
    client.quit()


def test_dashboard_queries_only_exported_metrics(make_server):
    server, admin = with_admin(make_server)
    upload(server, "dashboard.bin", 123_456)
    exported = {name for name, _ in admin.metrics()}

    queries = dashboard_queries()
    queried = set().union(*(metric_names(query) for query in queries))
    for query in queries:
        assert metric_names(query), f"query names no ftpsd or libunftp metric: {query}"
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics that /metrics does not export: {missing}"
    for panel, metric in REQUIRED_PANELS.items():
        assert metric in queried, f"no panel for {panel} ({metric})"


def test_monitoring_component_renders(tmp_path):
    kubectl = require_tool("kubectl")
    if yaml is None:
        pytest.fail("PyYAML is not installed: install python3-yaml")
    # kustomize takes no absolute paths, and an overlay inside k8s/ would be linted as part of it.
    base = os.path.relpath(REPO / "k8s" / "base", tmp_path)
    component = os.path.relpath(MONITORING, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\ncomponents:\n  - {component}\n"
    )
    result = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    objects = {(obj["kind"], obj["metadata"]["name"]): obj for obj in yaml.safe_load_all(result.stdout) if obj}

    service = objects[("Service", "ftpsd-admin")]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "admin", "port": 9090, "targetPort": "admin", "protocol": "TCP"}]
    monitor = objects[("ServiceMonitor", "ftpsd")]
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    annotations = objects[("Deployment", "ftpsd")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9090"
    pod = objects[("Deployment", "ftpsd")]["spec"]["template"]["spec"]
    ports = {port["name"]: port["containerPort"] for port in pod["containers"][0]["ports"]}
    assert ports["admin"] == 9090
    dashboard = objects[("ConfigMap", "ftpsd-grafana-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["ftpsd-dashboard.json"]) == json.loads(DASHBOARD.read_text())


# Prometheus and InfluxDB


class Daemon:
    """A server process started by a test, stopped by its PID at teardown."""

    def __init__(self, command, log_path, cwd):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def check_running(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.process.args[0]} exited with {self.process.returncode}:\n{self.log()[-3000:]}")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture
def daemons():
    started = []

    def start(command, log_path, cwd):
        daemon = Daemon(command, log_path, cwd)
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        daemon.stop()


def influx_config(root, http_port, rpc_port):
    # reporting-disabled stops influxd from sending usage data to influxdata.com. Every listener
    # is on loopback, and the UDP, Graphite, collectd and OpenTSDB inputs stay off by default.
    return f"""reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = false
  log-enabled = false
"""


def prometheus_config(admin_port, influx_port):
    return f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: ftpsd
    static_configs:
      - targets: ["127.0.0.1:{admin_port}"]
remote_write:
  - url: "http://127.0.0.1:{influx_port}/api/v1/prom/write?db=ftpsd"
    queue_config:
      batch_send_deadline: 1s
"""


def prometheus_value(port, query):
    """Returns the query's single value as a float, or None while it has none."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, body = http_get(url)
    if status != 200:
        return None
    result = json.loads(body)["data"]["result"]
    return float(result[0]["value"][1]) if len(result) == 1 else None


def influx_query(port, query, database=None):
    params = {"q": query}
    if database:
        params["db"] = database
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/query", data=urllib.parse.urlencode(params).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def influx_last_value(port, measurement, tag, value):
    result = influx_query(port, f"SELECT last(\"value\") FROM \"{measurement}\" WHERE \"{tag}\" = '{value}'", "ftpsd")
    series = result["results"][0].get("series")
    return series[0]["values"][0][1] if series else None


def test_prometheus_scrapes_and_remote_writes_to_influxdb(make_server, daemons, tmp_path):
    prometheus = require_tool("prometheus")
    influxd = require_tool("influxd")
    server, admin = with_admin(make_server)
    size = 654_321
    upload(server, "scraped.bin", size)
    assert admin.metric("ftpsd_transfer_bytes_total", direction="upload") == size

    influx_root = tmp_path / "influxdb"
    influx_root.mkdir()
    influx_port = free_port()
    (influx_root / "influxdb.conf").write_text(influx_config(influx_root, influx_port, free_port()))
    influx = daemons([influxd, "-config", str(influx_root / "influxdb.conf")], influx_root / "influxd.log", influx_root)

    def influx_up():
        influx.check_running()
        return http_get(f"http://127.0.0.1:{influx_port}/ping")[0] == 204 if port_open(influx_port) else False

    wait_until(influx_up, 60, "influxd to answer /ping")
    influx_query(influx_port, "CREATE DATABASE ftpsd")

    prometheus_root = tmp_path / "prometheus"
    prometheus_root.mkdir()
    prometheus_port = free_port()
    (prometheus_root / "prometheus.yml").write_text(prometheus_config(admin.port, influx_port))
    prom = daemons(
        [
            prometheus,
            f"--config.file={prometheus_root / 'prometheus.yml'}",
            f"--storage.tsdb.path={prometheus_root / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        prometheus_root / "prometheus.log",
        prometheus_root,
    )

    def scraped(query):
        prom.check_running()
        return prometheus_value(prometheus_port, query) if port_open(prometheus_port) else None

    wait_until(lambda: scraped('up{job="ftpsd"}') == 1, 60, "Prometheus to scrape ftpsd with up == 1")
    wait_until(
        lambda: scraped('ftpsd_transfer_bytes_total{job="ftpsd",direction="upload"}') == size,
        30,
        "Prometheus to hold the upload byte counter",
    )
    assert scraped('ftpsd_transfer_bytes_total{job="ftpsd",direction="download"}') == size
    # libunftp's metrics travel the same way.
    assert scraped('ftp_backend_write_bytes{job="ftpsd"}') == size

    def written():
        influx.check_running()
        return influx_last_value(influx_port, "ftpsd_transfer_bytes_total", "direction", "upload")

    wait_until(lambda: written() == size, 60, "InfluxDB to receive the upload byte counter by remote write")
    result = influx_query(influx_port, 'SHOW TAG VALUES FROM "ftpsd_transfer_bytes_total" WITH KEY = "job"', "ftpsd")
    assert result["results"][0]["series"][0]["values"] == [["job", "ftpsd"]]


def port_open(port):
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0
