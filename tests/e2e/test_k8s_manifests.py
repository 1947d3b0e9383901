"""The Kubernetes manifests as kustomize renders them: the Service's passive ports against the
configured range, the advertised address and its single source, the probes, the restricted
security settings, and the paths that the configuration and the mounts must share."""

import base64
import os
import re
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from conftest import BINARY, REPO, password_hash, require_tool

try:
    import yaml
except ImportError:  # render() fails the test with the fix
    yaml = None

K8S = REPO / "k8s"
OVERLAYS = ["base", "overlays/minikube", "overlays/web"]
LB_OVERLAYS = ["overlays/minikube", "overlays/web"]
LB_IP_ANNOTATION = "metallb.io/loadBalancerIPs"
# ftpsd's server.drain_timeout_secs when the ConfigMap does not set it.
DEFAULT_DRAIN_SECONDS = 25


class Rendering:
    """The objects of one `kubectl kustomize` run, looked up by kind and name."""

    def __init__(self, overlay):
        kubectl = require_tool("kubectl")
        result = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        self.objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def all(self, kind):
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind, name):
        """Returns the object; generated names match by their prefix before the content hash."""
        for obj in self.all(kind):
            actual = obj["metadata"]["name"]
            if actual == name or re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", actual):
                return obj
        raise AssertionError(f"no {kind} {name} in the rendering")

    @property
    def config(self):
        return self.get("ConfigMap", "ftpsd-config")["data"]

    @property
    def service(self):
        return self.get("Service", "ftpsd")

    @property
    def pod(self):
        return self.get("Deployment", "ftpsd")["spec"]["template"]["spec"]

    @property
    def container(self):
        (container,) = [c for c in self.pod["containers"] if c["name"] == "ftpsd"]
        return container


def parse_range(text):
    start, end = (int(part) for part in text.split("-"))
    return list(range(start, end + 1))


def listen_port(address):
    return int(address.rsplit(":", 1)[1])


def named_container_port(container, name):
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def render(overlay):
    if yaml is None:
        pytest.fail("PyYAML is not installed: run `python3 -m pip install pyyaml` (or .ci/deps)")
    return Rendering(overlay)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendering(request):
    return render(request.param)


@pytest.fixture(scope="module", params=LB_OVERLAYS)
def lb_rendering(request):
    return render(request.param)


# Ports


def test_service_lists_passive_range_exactly(rendering):
    configured = parse_range(rendering.config["FTPSD_PASSIVE__PORTS"])
    passive = [p for p in rendering.service["spec"]["ports"] if p["name"] != "ftp"]

    assert sorted(p["port"] for p in passive) == configured
    assert len({p["port"] for p in passive}) == len(passive), "a passive port is listed twice"
    for entry in passive:
        assert entry["targetPort"] == entry["port"], entry
        assert entry["protocol"] == "TCP", entry
        assert entry["name"] == f"pasv-{entry['port']}", entry


def test_control_port_maps_21_to_listener(rendering):
    (control,) = [p for p in rendering.service["spec"]["ports"] if p["name"] == "ftp"]

    assert control["port"] == 21
    container_port = named_container_port(rendering.container, control["targetPort"])
    assert container_port == 2121
    assert container_port == listen_port(rendering.config["FTPSD_SERVER__LISTEN"])


def test_network_policy_admits_passive_range(rendering):
    configured = parse_range(rendering.config["FTPSD_PASSIVE__PORTS"])
    policy = rendering.get("NetworkPolicy", "ftpsd")
    open_to_all = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]

    (rule,) = open_to_all
    ranges = [(p["port"], p.get("endPort", p["port"])) for p in rule["ports"]]
    assert (configured[0], configured[-1]) in ranges
    assert (2121, 2121) in ranges


def test_image_exposes_configured_ports(rendering):
    dockerfile = (REPO / "Dockerfile").read_text()
    configured = rendering.config["FTPSD_PASSIVE__PORTS"]

    expose = re.search(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE).group(1).split()
    assert f"{configured}/tcp" in expose
    assert "2121/tcp" in expose
    assert f'ports = "{configured}"' in dockerfile


# Service and advertised address


def test_service_keeps_client_address(rendering):
    spec = rendering.service["spec"]

    assert spec["type"] == "LoadBalancer"
    assert spec["externalTrafficPolicy"] == "Local"
    assert spec["sessionAffinity"] == "ClientIP"
    assert "loadBalancerIP" not in spec, "the deprecated field would be a second source of the address"


def test_advertised_host_matches_lb_address(lb_rendering):
    host = lb_rendering.config["FTPSD_PASSIVE__HOST"]
    annotations = lb_rendering.service["metadata"].get("annotations", {})

    assert annotations.get(LB_IP_ANNOTATION) == host

    pool = lb_rendering.get("IPAddressPool", "ftpsd-lab")
    first, last = (IPv4Address(part) for part in pool["spec"]["addresses"][0].split("-"))
    assert first <= IPv4Address(host) <= last
    advertisement = lb_rendering.get("L2Advertisement", "ftpsd-lab")
    assert pool["metadata"]["name"] in advertisement["spec"]["ipAddressPools"]
    for obj in (pool, advertisement):
        assert obj["metadata"]["namespace"] == "metallb-system"


def test_advertised_host_written_once():
    host = render("overlays/minikube").config["FTPSD_PASSIVE__HOST"]
    # The whole address, not the start of a pool range such as "<host>-<last>".
    standalone = re.compile(rf"(?<![\d.]){re.escape(host)}(?![\d.-])")

    places = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted(K8S.rglob("*"))
        if path.is_file()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if standalone.search(line)
    ]

    assert len(places) == 1, places
    assert places[0].startswith("k8s/overlays/minikube/kustomization.yaml:"), places


def test_base_leaves_address_to_overlays():
    base = render("base")

    assert LB_IP_ANNOTATION not in base.service["metadata"].get("annotations", {})
    assert base.config["FTPSD_PASSIVE__HOST"] != "from-connection", "the pod address is unreachable from outside"


# Probes and lifecycle


def test_probes_use_admin_endpoints(rendering):
    container = rendering.container
    admin_port = named_container_port(container, "admin")

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert named_container_port(container, container[probe]["httpGet"]["port"]) == admin_port
    assert admin_port == 9090
    assert listen_port(rendering.config["FTPSD_ADMIN__LISTEN"]) == admin_port


def test_grace_period_outlasts_drain(rendering):
    drain = int(rendering.config.get("FTPSD_SERVER__DRAIN_TIMEOUT_SECS", DEFAULT_DRAIN_SECONDS))

    assert rendering.pod["terminationGracePeriodSeconds"] > drain


def test_resources_set(rendering):
    resources = rendering.container["resources"]

    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[section]), resources


# Security settings


def assert_restricted(pod, container):
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]


def test_ftpsd_pod_is_restricted(rendering):
    pod = rendering.pod

    assert_restricted(pod, rendering.container)
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["fsGroup"] == 10001
    service_account = rendering.get("ServiceAccount", pod["serviceAccountName"])
    assert service_account["automountServiceAccountToken"] is False
    namespace = rendering.get("Namespace", "ftpsd")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_web_pod_reads_volume_read_only():
    web = render("overlays/web")
    pod = web.get("Deployment", "ftpsd-web")["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    assert_restricted(pod, container)
    assert web.pod["securityContext"]["fsGroup"] in pod["securityContext"]["supplementalGroups"]
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"] == {"claimName": "ftpsd-data", "readOnly": True}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "data"]
    assert mount["readOnly"] is True
    web.get("Ingress", "ftpsd-web")


# Paths shared by the configuration and the mounts


def test_configured_paths_are_mounted(rendering):
    config = rendering.config
    mounts = {m["name"]: m for m in rendering.container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendering.pod["volumes"]}

    assert config["FTPSD_STORAGE__DATA_DIR"] == mounts["data"]["mountPath"]
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == rendering.get("PersistentVolumeClaim", "ftpsd-data")["metadata"]["name"]

    users_dir = str(Path(config["FTPSD_AUTH__USERS_FILE"]).parent)
    assert users_dir == mounts["users"]["mountPath"]
    users_secret = rendering.get("Secret", "ftpsd-users")
    assert volumes["users"]["secret"]["secretName"] == users_secret["metadata"]["name"]
    assert Path(config["FTPSD_AUTH__USERS_FILE"]).name in users_secret["data"]

    assert config["FTPSD_TLS__CERT_FILE"] == mounts["tls"]["mountPath"] + "/tls.crt"
    assert config["FTPSD_TLS__KEY_FILE"] == mounts["tls"]["mountPath"] + "/tls.key"
    assert volumes["tls"]["secret"]["secretName"] == "ftpsd-tls"


# The configuration as ftpsd reads it


def image_config_file():
    """Returns the image's /etc/ftpsd/ftpsd.toml, as written in the Dockerfile's heredoc."""
    dockerfile = (REPO / "Dockerfile").read_text()
    match = re.search(r"^COPY [^\n]*<<'EOF' /etc/ftpsd/ftpsd.toml\n(.*?)^EOF$", dockerfile, re.MULTILINE | re.DOTALL)
    assert match, "the Dockerfile no longer writes /etc/ftpsd/ftpsd.toml from a heredoc"
    return match.group(1)


def check_config(environment, cwd):
    """Runs `ftpsd check-config` with only the given FTPSD_ variables."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FTPSD_")}
    env.update(environment)
    return subprocess.run([str(BINARY), "check-config"], env=env, cwd=cwd, capture_output=True, timeout=30)


def pod_environment(rendering, tmp_path):
    """Returns the pod's FTPSD_ variables on top of the image's configuration file, with the
    mounted paths moved into tmp_path and filled as the Secrets and the volume would fill them."""
    environment = dict(rendering.config)
    config_file = tmp_path / "ftpsd.toml"
    config_file.write_text(image_config_file())
    environment["FTPSD_CONFIG"] = str(config_file)

    (tmp_path / "data").mkdir()
    environment["FTPSD_STORAGE__DATA_DIR"] = str(tmp_path / "data")
    users_file = tmp_path / "users.toml"
    users_file.write_text(f'[[users]]\nname = "alice"\npassword_hash = "{password_hash()}"\n')
    environment["FTPSD_AUTH__USERS_FILE"] = str(users_file)

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=ftpsd-test", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, timeout=60, check=True,
    )
    environment["FTPSD_TLS__CERT_FILE"] = str(cert)
    environment["FTPSD_TLS__KEY_FILE"] = str(key)
    return environment


def test_pod_configuration_passes_check_config(rendering, tmp_path, ftpsd_binary):
    result = check_config(pod_environment(rendering, tmp_path), tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    effective = result.stdout.decode()
    assert f'host = "{rendering.config["FTPSD_PASSIVE__HOST"]}"' in effective
    assert f'ports = "{rendering.config["FTPSD_PASSIVE__PORTS"]}"' in effective
    assert 'format = "json"' in effective


def test_service_link_variables_ignored(rendering, tmp_path, ftpsd_binary):
    """A manifest without enableServiceLinks: false gets these variables for the Service named
    ftpsd. They share the FTPSD_ prefix but are not keys, so ftpsd ignores them. A misspelt key
    is still rejected."""
    environment = pod_environment(rendering, tmp_path)
    environment["FTPSD_PORT"] = "tcp://192.0.2.1:21"
    environment["FTPSD_PORT_21_TCP_ADDR"] = "192.0.2.1"
    environment["FTPSD_SERVICE_HOST"] = "192.0.2.1"

    result = check_config(environment, tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")

    environment["FTPSD_PASSIVE_HOST"] = "192.0.2.1"
    misspelt = check_config(environment, tmp_path)
    assert misspelt.returncode != 0
    assert "passive_host" in misspelt.stderr.decode(errors="replace")


def test_placeholder_users_file_rejected(rendering, tmp_path, ftpsd_binary):
    """The committed users files have no entry, so a deployment cannot start with accounts
    that nobody chose."""
    environment = pod_environment(rendering, tmp_path)
    secret = rendering.get("Secret", "ftpsd-users")
    placeholder = tmp_path / "placeholder-users.toml"
    placeholder.write_bytes(base64.b64decode(secret["data"]["users.toml"]))
    environment["FTPSD_AUTH__USERS_FILE"] = str(placeholder)

    result = check_config(environment, tmp_path)

    assert result.returncode != 0
    assert "no [[users]] entry" in result.stderr.decode(errors="replace")
