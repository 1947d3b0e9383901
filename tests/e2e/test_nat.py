"""The LoadBalancer NAT path, for real: ftpsd in a pod namespace behind a node that rewrites
addresses like kube-proxy, driven by lftp and curl from a client namespace through the
LoadBalancer address (see netns_helpers.py for the topology).

Which clients trust the address in a PASV reply decides what breaks when it is wrong:
- lftp connects to the PASV address unless ftp:fix-pasv-address repairs it, which it does only
  for private addresses, so these tests turn it off.
- curl has ignored the PASV address by default since 7.74 (--ftp-skip-pasv-ip) and connects to
  the control connection's address instead; --no-ftp-skip-pasv-ip makes it trust the reply.
- An EPSV reply carries only a port, so EPSV never depends on the advertised address.
"""

import hashlib
import os
import re

import pytest

from conftest import PASSWORD
from netns_helpers import (
    CLIENT_ADDRESS,
    LB_ADDRESS,
    NODE_POD_SIDE,
    OTHER_NODE_ADDRESS,
    POD_ADDRESS,
    LoadBalancerPath,
    PodServer,
)

SESSIONS = 100
# Four ways in, used in turn: each client with each passive command.
WAYS = [("lftp", "PASV"), ("lftp", "EPSV"), ("curl", "PASV"), ("curl", "EPSV")]
# Seconds a client waits for a data connection before it gives up. Short, because the failing
# runs wait this long on purpose.
CONNECT_TIMEOUT = 5
SESSION_TIMEOUT = 60


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def passive_reply_address(output):
    """Returns the address of the first 227 reply in a client's debug output, as a dotted quad."""
    match = re.search(r"227 Entering Passive Mode \((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)", output)
    return ".".join(match.groups()[:4]) if match else None


class Session:
    """One client login through the LoadBalancer address: upload, list, download."""

    def __init__(self, path, workdir, number, client, mode, skip_pasv_ip=False):
        self.path = path
        self.client = client
        self.mode = mode
        self.skip_pasv_ip = skip_pasv_ip
        self.name = f"s{number:03d}-{client}-{mode}.bin"
        self.source = workdir / self.name
        self.copy = workdir / f"{self.name}.copy"
        self.source.write_bytes(os.urandom(1 + (number * 7919) % 200_000))
        self.result = None

    @property
    def output(self):
        return (self.result.stdout + self.result.stderr).decode(errors="replace")

    def run(self):
        command = self._lftp() if self.client == "lftp" else self._curl()
        self.result = self.path.exec(self.path.client, *command, timeout=SESSION_TIMEOUT, check=False)
        return self

    def _lftp(self):
        settings = (
            "set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:verify-certificate no; "
            f"set net:max-retries 1; set net:timeout {CONNECT_TIMEOUT}; set cmd:fail-exit true; "
            "set ftp:passive-mode true; set ftp:fix-pasv-address no; "
            f"set ftp:prefer-epsv {'yes' if self.mode == 'EPSV' else 'no'}; "
        )
        script = f"put {self.source} -o {self.name}; cls -1; get {self.name} -o {self.copy}; bye"
        return ["lftp", "-d", "-u", f"alice,{PASSWORD}", "-p", "21", "-e", settings + script, LB_ADDRESS]

    def _curl(self):
        common = ["--verbose", "--ssl-reqd", "--insecure", "--user", f"alice:{PASSWORD}",
                  "--connect-timeout", str(CONNECT_TIMEOUT), "--max-time", str(SESSION_TIMEOUT - 10)]
        if self.mode == "PASV":
            common += ["--disable-epsv"]
            common += ["--ftp-skip-pasv-ip"] if self.skip_pasv_ip else ["--no-ftp-skip-pasv-ip"]
        else:
            common += ["--ftp-pasv"]
        url = f"ftp://{LB_ADDRESS}:21"
        # --next keeps one curl process, so the three transfers share one login.
        return [
            "curl", *common, "--upload-file", str(self.source), f"{url}/{self.name}",
            "--next", *common, "--list-only", f"{url}/",
            "--next", *common, "--output", str(self.copy), f"{url}/{self.name}",
        ]

    def problems(self):
        """Lists everything wrong with a session that should have worked (empty when it did)."""
        if self.result.returncode != 0:
            return [f"{self.client} {self.mode} exited with {self.result.returncode}: {self.output[-1500:]}"]
        problems = []
        if not re.search(rf"(--->|>) {self.mode}\b", self.output):
            problems.append(f"{self.client} never sent {self.mode}")
        logins = len(re.findall(r"(--->|>) USER ", self.output))
        if logins != 1:
            problems.append(f"{self.client} logged in {logins} times instead of once")
        if self.name not in self.result.stdout.decode(errors="replace").split():
            problems.append(f"{self.name} missing from the listing")
        if not self.copy.exists() or sha256(self.copy) != sha256(self.source):
            problems.append(f"{self.name} downloaded differs from the upload")
        return problems


@pytest.fixture
def lb_path():
    with LoadBalancerPath(tag="nat") as path:
        yield path


@pytest.fixture
def pod_server(lb_path, tmp_path, ftpsd_binary):
    """Starts ftpsd in the pod namespace; stops it before the namespaces are removed."""
    servers = []

    def start(passive_host=None):
        root = tmp_path / f"pod{len(servers)}"
        root.mkdir()
        server = PodServer(root, lb_path, passive_host=passive_host)
        servers.append(server)
        return server.start(timeout=30)

    yield start
    for server in servers:
        server.stop()


def run_sessions(lb_path, workdir, count, ways=WAYS, stop_after_failures=3):
    """Runs sessions one after another; returns the sessions and every problem found."""
    sessions, problems = [], []
    for number in range(count):
        client, mode = ways[number % len(ways)]
        session = Session(lb_path, workdir, number, client, mode).run()
        sessions.append(session)
        problems += [f"session {number}: {problem}" for problem in session.problems()]
        if len(problems) >= stop_after_failures:
            break
    return sessions, problems


def test_lb_address_serves_100_sessions(lb_path, pod_server, tmp_path):
    server = pod_server(passive_host=LB_ADDRESS)

    sessions, problems = run_sessions(lb_path, tmp_path, SESSIONS)

    assert problems == [], "\n".join(problems) + f"\nserver log:\n{server.log()[-4000:]}"
    assert len(sessions) == SESSIONS
    for session in sessions:
        if session.mode == "PASV":
            assert passive_reply_address(session.output) == LB_ADDRESS, session.output[-1500:]
    uploaded = sorted(path.name for path in (server.data_dir / "alice").iterdir())
    assert uploaded == sorted(session.name for session in sessions)
    # With Local traffic policy the pod logs the client's own address, not the node's.
    server.wait_for_log(rf"transfer finished.*peer=\"?{re.escape(CLIENT_ADDRESS)}")
    assert NODE_POD_SIDE not in server.log()


def test_pod_address_advertised_breaks_pasv(lb_path, pod_server, tmp_path):
    # The default passive host, from-connection, advertises the address the pod was reached on.
    server = pod_server(passive_host=None)

    lftp = Session(lb_path, tmp_path, 0, "lftp", "PASV").run()
    curl = Session(lb_path, tmp_path, 1, "curl", "PASV").run()

    for session in (lftp, curl):
        assert passive_reply_address(session.output) == POD_ADDRESS, session.output[-1500:]
        assert session.result.returncode != 0, session.output[-1500:]
        assert not session.copy.exists()
    # What users see: the client connects to the pod address, which is not routable from
    # outside, and gives up after its connect timeout.
    assert f"Connecting data socket to ({POD_ADDRESS})" in lftp.output, lftp.output[-1500:]
    assert "Timeout" in lftp.output, lftp.output[-1500:]
    assert f"Trying {POD_ADDRESS}:" in curl.output, curl.output[-1500:]
    # curl's closing message names the control address and port, not the one that failed.
    assert curl.result.returncode == 28, curl.output[-1500:]

def test_pod_address_spares_epsv_and_curl_default(lb_path, pod_server, tmp_path):
    server = pod_server(passive_host=None)

    survivors = [
        Session(lb_path, tmp_path, 0, "lftp", "EPSV").run(),
        Session(lb_path, tmp_path, 1, "curl", "EPSV").run(),
        Session(lb_path, tmp_path, 2, "curl", "PASV", skip_pasv_ip=True).run(),
    ]

    for session in survivors:
        assert session.problems() == [], session.output[-1500:] + server.log()[-2000:]
    assert passive_reply_address(survivors[2].output) == POD_ADDRESS


def test_cluster_policy_hides_client_address(lb_path, pod_server, tmp_path):
    lb_path.snat_like_cluster_policy()
    server = pod_server(passive_host=LB_ADDRESS)

    sessions, problems = run_sessions(lb_path, tmp_path, 2 * len(WAYS))

    # One node rewrites both connections to the same address, so transfers still work...
    assert problems == [], "\n".join(problems) + f"\nserver log:\n{server.log()[-4000:]}"
    # ...but the pod logs the node's address for every session instead of the client's.
    server.wait_for_log(rf"transfer finished.*peer=\"?{re.escape(NODE_POD_SIDE)}")
    assert CLIENT_ADDRESS not in server.log()


def test_cluster_policy_data_via_other_node_fails(lb_path, pod_server, tmp_path):
    lb_path.snat_like_cluster_policy(data_via_other_node=True)
    server = pod_server(passive_host=LB_ADDRESS)

    sessions = [Session(lb_path, tmp_path, number, client, mode).run() for number, (client, mode) in enumerate(WAYS)]

    # libunftp closes a data connection whose source address differs from the control
    # connection's, so every way in fails, EPSV included.
    for session in sessions:
        assert session.result.returncode != 0, session.output[-1500:]
        assert not session.copy.exists()
    server.wait_for_log(
        rf"does not match the IP.*{re.escape(NODE_POD_SIDE)}|{re.escape(OTHER_NODE_ADDRESS)}.*does not match the IP"
    )
