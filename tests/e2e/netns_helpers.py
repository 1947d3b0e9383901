"""Network namespaces that stand in for a Kubernetes LoadBalancer path, for tests that need
more than loopback.

A test builds three namespaces with veth links between them:

    client 203.0.113.2 --- 203.0.113.1 node 198.51.100.1 --- 198.51.100.2 pod

The node forwards and rewrites like kube-proxy does for a LoadBalancer Service: it DNATs the
LoadBalancer address (192.0.2.10) port 21 to the pod's port 2121 and the passive range to the
same ports on the pod. The pod network is not reachable from the client except through that
DNAT, as in a real cluster. All addresses come from the documentation ranges 192.0.2.0/24,
198.51.100.0/24 and 203.0.113.0/24, live only inside these namespaces, and disappear with them.
No rule or address is ever added to the namespace the tests run in.

Everything here needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), ip(8) and iptables(8).
"""

import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import Server

LB_ADDRESS = "192.0.2.10"
CLIENT_ADDRESS = "203.0.113.2"
NODE_CLIENT_SIDE = "203.0.113.1"
NODE_POD_SIDE = "198.51.100.1"
POD_ADDRESS = "198.51.100.2"
# A second node address on the pod link: the source that kube-proxy's SNAT gives connections
# that entered the cluster through another node.
OTHER_NODE_ADDRESS = "198.51.100.3"

# Ports as in k8s/base: the Service maps 21 to the container's 2121, and the passive range
# keeps its numbers.
LB_CONTROL_PORT = 21
POD_CONTROL_PORT = 2121
PASSIVE_START = 30000
PASSIVE_END = 30019

COMMAND_TIMEOUT = 30


def require_root_networking():
    """Fails the test unless this process may create network namespaces and has the tools."""
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run .ci/deps (or make test) to install it")
    if os.geteuid() != 0:
        pytest.fail("the network namespace tests need root (CAP_NET_ADMIN): run them as root, as CI does")


def run(*command, timeout=COMMAND_TIMEOUT, check=True):
    """Runs one command and returns the completed process. Raises with its output on failure."""
    result = subprocess.run(command, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed with {result.returncode}: {result.stderr.decode(errors='replace')}"
        )
    return result


class LoadBalancerPath:
    """The client, node and pod namespaces, named after this process's PID so that parallel
    runs never collide. Use it as a context manager: leaving it removes every rule and
    namespace, also after a failure."""

    def __init__(self, tag="lb"):
        pid = os.getpid()
        self.client = f"ftpsd-{tag}-{pid}-client"
        self.node = f"ftpsd-{tag}-{pid}-node"
        self.pod = f"ftpsd-{tag}-{pid}-pod"
        self.namespaces = [self.client, self.node, self.pod]
        self.created = []

    def __enter__(self):
        require_root_networking()
        try:
            self._build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info):
        self.remove()
        return False

    def exec(self, namespace, *command, timeout=COMMAND_TIMEOUT, check=True):
        return run("ip", "netns", "exec", namespace, *command, timeout=timeout, check=check)

    def _build(self):
        for namespace in self.namespaces:
            run("ip", "netns", "add", namespace)
            self.created.append(namespace)
            self.exec(namespace, "ip", "link", "set", "lo", "up")

        # Each veth pair is created directly inside its two namespaces, so no interface name
        # ever exists in the test runner's namespace.
        run("ip", "link", "add", "eth0", "netns", self.client, "type", "veth", "peer", "name", "to-client", "netns", self.node)
        run("ip", "link", "add", "eth0", "netns", self.pod, "type", "veth", "peer", "name", "to-pod", "netns", self.node)

        self.exec(self.client, "ip", "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "eth0")
        self.exec(self.client, "ip", "link", "set", "eth0", "up")
        self.exec(self.client, "ip", "route", "add", "default", "via", NODE_CLIENT_SIDE)

        self.exec(self.node, "ip", "addr", "add", f"{NODE_CLIENT_SIDE}/24", "dev", "to-client")
        self.exec(self.node, "ip", "addr", "add", f"{NODE_POD_SIDE}/24", "dev", "to-pod")
        self.exec(self.node, "ip", "addr", "add", f"{OTHER_NODE_ADDRESS}/24", "dev", "to-pod")
        self.exec(self.node, "ip", "link", "set", "to-client", "up")
        self.exec(self.node, "ip", "link", "set", "to-pod", "up")
        self.exec(self.node, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

        self.exec(self.pod, "ip", "addr", "add", f"{POD_ADDRESS}/24", "dev", "eth0")
        self.exec(self.pod, "ip", "link", "set", "eth0", "up")
        self.exec(self.pod, "ip", "route", "add", "default", "via", NODE_POD_SIDE)

        # kube-proxy's rules for a LoadBalancer Service, reduced to one endpoint.
        self.iptables("-t", "nat", "-A", "PREROUTING", "-d", LB_ADDRESS, "-p", "tcp", "--dport", str(LB_CONTROL_PORT),
                      "-j", "DNAT", "--to-destination", f"{POD_ADDRESS}:{POD_CONTROL_PORT}")
        self.iptables("-t", "nat", "-A", "PREROUTING", "-d", LB_ADDRESS, "-p", "tcp", "--dport", f"{PASSIVE_START}:{PASSIVE_END}",
                      "-j", "DNAT", "--to-destination", POD_ADDRESS)
        # Outside clients have no route into the pod network: anything else from the client
        # side is dropped silently, as an unroutable address on the Internet would be.
        self.iptables("-A", "FORWARD", "-i", "to-client", "-o", "to-pod", "-m", "conntrack", "!", "--ctstate", "DNAT", "-j", "DROP")

    def iptables(self, *arguments):
        self.exec(self.node, "iptables", "-w", "5", *arguments)

    def snat_like_cluster_policy(self, data_via_other_node=False):
        """Rewrites the client's source address as kube-proxy does for externalTrafficPolicy:
        Cluster. With data_via_other_node, passive data connections get another node's address,
        as when the load balancer sends them to a different node than the control connection."""
        if data_via_other_node:
            self.iptables("-t", "nat", "-A", "POSTROUTING", "-o", "to-pod", "-p", "tcp", "--dport", str(POD_CONTROL_PORT),
                          "-m", "conntrack", "--ctstate", "DNAT", "-j", "SNAT", "--to-source", NODE_POD_SIDE)
            self.iptables("-t", "nat", "-A", "POSTROUTING", "-o", "to-pod", "-p", "tcp", "--dport", f"{PASSIVE_START}:{PASSIVE_END}",
                          "-m", "conntrack", "--ctstate", "DNAT", "-j", "SNAT", "--to-source", OTHER_NODE_ADDRESS)
        else:
            self.iptables("-t", "nat", "-A", "POSTROUTING", "-o", "to-pod", "-m", "conntrack", "--ctstate", "DNAT",
                          "-j", "SNAT", "--to-source", NODE_POD_SIDE)

    def remove(self):
        """Stops what still runs in the namespaces, flushes the node's rules and deletes the
        namespaces. Safe to call twice; raises if a namespace survives."""
        for namespace in reversed(self.created):
            self._stop_processes(namespace)
        if self.node in self.created:
            for table in ("nat", "filter"):
                self.exec(self.node, "iptables", "-w", "5", "-t", table, "-F", check=False)
        for namespace in reversed(self.created):
            run("ip", "netns", "delete", namespace, check=False)
        self.created = []

        listed = run("ip", "netns", "list").stdout.decode()
        leftovers = [name for name in self.namespaces if name in listed.split()]
        assert not leftovers, f"network namespaces left behind: {leftovers}"

    def _stop_processes(self, namespace):
        # Only processes that this test started can live in a namespace it created.
        pids = run("ip", "netns", "pids", namespace, check=False).stdout.decode().split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = run("ip", "netns", "pids", namespace, check=False).stdout.decode().split()
            time.sleep(0.05)


class PodServer(Server):
    """A conftest Server that runs inside the pod namespace on the container's ports:
    control 2121 on every address, passive range 30000-30019."""

    def __init__(self, root, path, passive_host=None, **options):
        env = {
            "FTPSD_SERVER__LISTEN": f"0.0.0.0:{POD_CONTROL_PORT}",
            "FTPSD_PASSIVE__PORTS": f"{PASSIVE_START}-{PASSIVE_END}",
        }
        if passive_host is not None:
            env["FTPSD_PASSIVE__HOST"] = passive_host
        env.update(options.pop("env", {}))
        super().__init__(root, env=env, **options)
        self.path = path
        self.host = POD_ADDRESS
        self.port = POD_CONTROL_PORT
        self.passive_start, self.passive_end = PASSIVE_START, PASSIVE_END

    def command(self):
        return ["ip", "netns", "exec", self.path.pod, *super().command()]

    def _greets(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"ftpsd exited with {self.process.returncode} before it was ready:\n{self.log()}")
        # The runner's namespace has no route to the pod, so the probe runs inside it.
        probe = (
            "import socket, sys\n"
            "try:\n"
            f"    c = socket.create_connection(('{POD_ADDRESS}', {POD_CONTROL_PORT}), timeout=1)\n"
            "    c.settimeout(2)\n"
            "    sys.exit(0 if c.recv(64).startswith(b'220') else 1)\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        result = self.path.exec(self.path.pod, "python3", "-c", probe, timeout=10, check=False)
        return result.returncode == 0

