"""The statically linked binary (`make static`) serving from an empty root directory.

No container engine runs in CI, so an empty root directory stands in for the Alpine image. It
contains only the binary, its configuration, the users file, the two writable volume
directories and the device nodes that a container runtime provides (null, zero, random,
urandom). The server runs there under chroot, in its own mount, IPC and UTS namespaces, as uid
10001 without capabilities, and lftp drives it over TLS from outside on loopback.

The image itself uses a musl binary; this one links glibc statically (crt-static) because it
builds with the host toolchain. NOTE: statically linked glibc cannot load its NSS modules, so
this binary cannot resolve a DNS name given as passive.host (the tests use addresses only).
"""

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import BINARY, REPO, Server, free_port, require_tool

STATIC_BINARY = Path(
    os.environ.get("FTPSD_STATIC_BIN", REPO / "target" / "x86_64-unknown-linux-gnu" / "release" / "ftpsd")
)
BUILD_TIMEOUT = 3600
# The image's numeric user (Dockerfile, k8s/base/deployment.yaml).
UID = 10001

# (path, major, minor) of the character devices that container runtimes create in /dev.
DEVICES = [("dev/null", 1, 3), ("dev/zero", 1, 5), ("dev/random", 1, 8), ("dev/urandom", 1, 9)]
# The only directories the server may write to: the data volume and the generated certificate.
WRITABLE = ["srv/ftp", "var/lib/ftpsd/certs"]


def require_root():
    if os.geteuid() != 0:
        pytest.fail("chroot, mknod and the switch to uid 10001 need root: run this test as root, as CI does")


@pytest.fixture(scope="session")
def static_binary():
    """Builds the static binary once per test run, and cargo rebuilds only what changed. With
    FTPSD_STATIC_BIN set, that file is used as it is."""
    if "FTPSD_STATIC_BIN" not in os.environ:
        result = subprocess.run(["make", "static"], cwd=REPO, capture_output=True, timeout=BUILD_TIMEOUT)
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]
    if not STATIC_BINARY.is_file():
        pytest.fail(f"{STATIC_BINARY} not found: build it with `make static` (or set FTPSD_STATIC_BIN)")
    return STATIC_BINARY


def build_rootfs(rootfs, binary, users_file, config_text):
    """Lays out the image's paths in an empty directory. Everything belongs to root except the
    writable volume directories."""
    for directory in ["usr/local/bin", "etc/ftpsd/users", "dev", *WRITABLE]:
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    for directory in WRITABLE:
        os.chown(rootfs / directory, UID, UID)

    target = rootfs / "usr/local/bin/ftpsd"
    target.write_bytes(binary.read_bytes())
    target.chmod(0o755)

    (rootfs / "etc/ftpsd/ftpsd.toml").write_text(config_text)
    users = rootfs / "etc/ftpsd/users/users.toml"
    users.write_bytes(users_file.read_bytes())
    # As the users Secret is mounted in Kubernetes: root-owned, readable through the group.
    os.chown(users, 0, UID)
    users.chmod(0o440)

    for path, major, minor in DEVICES:
        os.mknod(rootfs / path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        (rootfs / path).chmod(0o666)


def snapshot(rootfs):
    return {str(path.relative_to(rootfs)) for path in rootfs.rglob("*")}


class RootfsServer(Server):
    """A conftest Server whose process runs chrooted in `rootfs` with the image's paths."""

    def __init__(self, root, binary):
        super().__init__(root)
        self.rootfs = self.root / "rootfs"
        self.admin_port = free_port()
        build_rootfs(self.rootfs, binary, self.users_file, self._rootfs_config())
        self.data_dir = self.rootfs / "srv/ftp"
        self.certs_dir = self.rootfs / "var/lib/ftpsd/certs"

    def _rootfs_config(self):
        return (
            "[server]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            "[passive]\n"
            f'ports = "{self.passive_start}-{self.passive_end}"\n'
            f'host = "127.0.0.1"\n'
            "[tls]\n"
            'generated_dir = "/var/lib/ftpsd/certs"\n'
            "[storage]\n"
            'data_dir = "/srv/ftp"\n'
            "[auth]\n"
            'users_file = "/etc/ftpsd/users/users.toml"\n'
            "[admin]\n"
            f'listen = "127.0.0.1:{self.admin_port}"\n'
        )

    def command(self):
        return [
            "unshare", "--mount", "--ipc", "--uts",
            "chroot", f"--userspec={UID}:{UID}", f"--groups={UID}", str(self.rootfs),
            "/usr/local/bin/ftpsd", "--config", "/etc/ftpsd/ftpsd.toml",
        ]


def process_status(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return fields


def test_static_binary_has_no_interpreter(static_binary):
    description = subprocess.run([require_tool("file"), "-b", str(static_binary)], capture_output=True, timeout=30)
    ldd = subprocess.run(["ldd", str(static_binary)], capture_output=True, timeout=30)

    text = description.stdout.decode()
    assert "statically linked" in text or "static-pie linked" in text, text
    assert "interpreter" not in text, text
    ldd_text = (ldd.stdout + ldd.stderr).decode()
    assert "not a dynamic executable" in ldd_text or "statically linked" in ldd_text, ldd_text


def test_static_binary_serves_from_empty_root(static_binary, tmp_path):
    require_root()
    require_tool("unshare")
    server = RootfsServer(tmp_path, static_binary)
    before = snapshot(server.rootfs)
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    copy = tmp_path / "download.bin"

    server.start()
    try:
        status = process_status(server.process.pid)
        server.lftp(f"put {source} -o upload.bin; get upload.bin -o {copy}")
    finally:
        server.stop()

    assert status["Uid"] == [str(UID)] * 4, status["Uid"]
    assert status["Gid"] == [str(UID)] * 4, status["Gid"]
    assert status["CapEff"] == ["0000000000000000"], status["CapEff"]

    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert hashlib.sha256((server.data_dir / "alice" / "upload.bin").read_bytes()).hexdigest() == expected
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == expected

    created = snapshot(server.rootfs) - before
    outside_volumes = sorted(path for path in created if not any(path.startswith(w + "/") for w in WRITABLE))
    assert outside_volumes == [], f"the server wrote outside its volumes: {outside_volumes}"
    assert (server.certs_dir / "cert.pem").is_file(), "the generated certificate should be on its volume"
    # The server's uid cannot replace its own binary.
    binary = server.rootfs / "usr/local/bin/ftpsd"
    assert binary.stat().st_uid == 0
    assert not binary.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def test_dynamic_binary_cannot_start_in_empty_root(tmp_path):
    """The negative twin: the normal, dynamically linked build finds no loader or libc in the
    same root, which proves that the root really is empty."""
    require_root()
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} not found: build it with `make build` (or set FTPSD_BIN)")
    description = subprocess.run([require_tool("file"), "-b", str(BINARY)], capture_output=True, timeout=30)
    assert "dynamically linked" in description.stdout.decode(), description.stdout
    server = RootfsServer(tmp_path, BINARY)

    result = subprocess.run(server.command(), capture_output=True, timeout=30)

    assert result.returncode == 127, result
    assert b"No such file or directory" in result.stderr, result.stderr



def test_static_binary_answers_probes_from_empty_root(static_binary, tmp_path):
    require_root()
    server = RootfsServer(tmp_path, static_binary)

    server.start()
    try:
        answers = {
            path: subprocess.run(
                [require_tool("curl"), "--silent", "--show-error", "--fail", f"http://127.0.0.1:{server.admin_port}{path}"],
                capture_output=True,
                timeout=30,
            )
            for path in ("/healthz", "/readyz")
        }
    finally:
        server.stop()

    for path, answer in answers.items():
        assert answer.returncode == 0, f"{path}: {answer.stderr.decode(errors='replace')}\n{server.log()[-2000:]}"
