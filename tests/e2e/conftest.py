"""Fixtures that run the real ftpsd binary on loopback and drive it with real clients.

Every test gets its own temporary data directory, control port, passive range, generated
certificate and server process. Readiness is polled, never slept for, and every wait has a
deadline. Clients that a test needs (lftp, curl) must be installed: a missing client fails the
test instead of skipping it (`.ci/deps` installs them).
"""

import ftplib
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("FTPSD_BIN", REPO / "target" / "release" / "ftpsd"))

# Every password in tests is this one; hashing once per run keeps start-up fast.
PASSWORD = "secret"
_HASH_CACHE = {}

# Users that every server gets unless a test passes its own list.
DEFAULT_USERS = [
    {"name": "alice", "home": "alice"},
    {"name": "bob", "home": "bob"},
    {"name": "reader", "home": "alice", "read_only": True},
]


def require_tool(name):
    """Returns the tool's path; fails the test when it is missing, because a skipped client
    check would hide a gap."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run .ci/deps (or make test) to install the test clients")
    return path


def password_hash(password=PASSWORD):
    if password not in _HASH_CACHE:
        result = subprocess.run(
            [str(BINARY), "hash-password"], input=password.encode(), capture_output=True, timeout=30, check=True
        )
        _HASH_CACHE[password] = result.stdout.decode().strip()
    return _HASH_CACHE[password]


def _port_is_free(port, host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_range(count=10):
    """Finds `count` consecutive free ports outside the kernel's ephemeral range."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        start = rng.randrange(20000, 31000 - count)
        if all(_port_is_free(port) for port in range(start, start + count)):
            return start, start + count - 1
    raise RuntimeError(f"no {count} consecutive free ports found between 20000 and 31000")


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def wait_until(predicate, timeout, message):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {message}")


class Server:
    """One ftpsd process with its own directory, ports and log file."""

    def __init__(self, root, users=None, settings=None, args=(), env=None, passive_count=10):
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.certs_dir = self.root / "certs"
        self.users_file = self.root / "users.toml"
        self.config_file = self.root / "ftpsd.toml"
        self.log_file = self.root / "ftpsd.log"
        self.port = free_port()
        self.passive_start, self.passive_end = free_port_range(passive_count)
        self.host = "127.0.0.1"
        self.process = None
        self.extra_args = list(args)
        self.extra_env = dict(env or {})
        self._write_users(DEFAULT_USERS if users is None else users)
        self._write_config(settings or {})

    def _write_users(self, users):
        lines = []
        for user in users:
            lines.append("[[users]]")
            lines.append(f'name = "{user["name"]}"')
            lines.append(f'password_hash = "{password_hash(user.get("password", PASSWORD))}"')
            if user.get("home"):
                lines.append(f'home = "{user["home"]}"')
            if user.get("read_only"):
                lines.append("read_only = true")
            lines.append("")
        self.users_file.write_text("\n".join(lines))

    def _write_config(self, settings):
        """Writes ftpsd.toml: this server's ports and paths, then the test's `settings`
        ({section: {key: value}}), which win over the defaults here."""
        sections = {
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "passive": {"ports": f"{self.passive_start}-{self.passive_end}"},
            "tls": {"generated_dir": str(self.certs_dir)},
            "storage": {"data_dir": str(self.data_dir)},
            "auth": {"users_file": str(self.users_file)},
        }
        for section, values in settings.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {toml_value(value)}")
        self.config_file.write_text("\n".join(lines) + "\n")

    def command(self):
        return [str(BINARY), "--config", str(self.config_file), *self.extra_args]

    def start(self, timeout=20):
        env = {key: value for key, value in os.environ.items() if not key.startswith("FTPSD_")}
        env.update(self.extra_env)
        env.setdefault("RUST_LOG", "info")
        self._log_handle = open(self.log_file, "ab")
        self.process = subprocess.Popen(
            self.command(), stdout=self._log_handle, stderr=subprocess.STDOUT, env=env, cwd=self.root
        )
        wait_until(self._greets, timeout, f"ftpsd to answer on port {self.port} (log: {self.log_file})")
        return self

    def _greets(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"ftpsd exited with {self.process.returncode} before it was ready:\n{self.log()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as connection:
                connection.settimeout(2)
                return connection.recv(64).startswith(b"220")
        except OSError:
            return False

    def stop(self, timeout=15):
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._log_handle.close()
        return self.process.returncode

    def log(self):
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def wait_for_log(self, pattern, timeout=10):
        regex = re.compile(pattern)
        return wait_until(lambda: regex.search(self.log()), timeout, f"log line matching {pattern!r}")

    @property
    def cert_file(self):
        return self.certs_dir / "cert.pem"

    # Clients

    def ftps(self, user="alice", password=PASSWORD, timeout=20):
        """A logged-in Python ftplib FTP_TLS client with a protected data channel."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client = ftplib.FTP_TLS(context=context, timeout=timeout)
        client.connect(self.host, self.port)
        client.login(user, password)
        client.prot_p()
        return client

    def lftp(self, script, user="alice", password=PASSWORD, timeout=120, check=True):
        """Runs an lftp script over explicit TLS; returns the completed process."""
        lftp = require_tool("lftp")
        settings = (
            "set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:verify-certificate no; "
            "set net:max-retries 1; set net:timeout 15; set cmd:fail-exit true; "
        )
        result = subprocess.run(
            [lftp, "-u", f"{user},{password}", "-p", str(self.port), "-e", settings + script + "; bye", self.host],
            capture_output=True,
            timeout=timeout,
            # lftp converts file names through the locale's charset; UTF-8 keeps them byte-exact.
            env={**os.environ, "LC_ALL": "C.UTF-8"},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"lftp failed with {result.returncode}: {result.stderr.decode(errors='replace')}\nserver log:\n{self.log()[-4000:]}"
            )
        return result

    def curl(self, *args, user="alice", password=PASSWORD, timeout=120, check=True):
        """Runs curl with explicit TLS required on both channels; returns the completed process."""
        curl = require_tool("curl")
        result = subprocess.run(
            [curl, "--silent", "--show-error", "--ssl-reqd", "--insecure", "--user", f"{user}:{password}", *args],
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"curl failed with {result.returncode}: {result.stderr.decode(errors='replace')}")
        return result

    def url(self, path=""):
        return f"ftp://{self.host}:{self.port}/{path}"


@pytest.fixture(scope="session")
def ftpsd_binary():
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} not found: build it with `make build` (or set FTPSD_BIN)")
    return BINARY


@pytest.fixture
def make_server(tmp_path, ftpsd_binary):
    """Factory for servers with custom users, config or flags; all are stopped at teardown."""
    servers = []

    def factory(**options):
        root = tmp_path / f"server{len(servers)}"
        root.mkdir()
        server = Server(root, **options)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server):
    """A running ftpsd with the default users (alice, bob, and the read-only reader)."""
    return make_server().start()
