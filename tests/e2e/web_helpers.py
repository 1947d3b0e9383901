"""A real nginx that serves ftpsd's data directory, and ftpsd run as an unprivileged uid, for the
website tests.

pytest keeps its temporary directories at mode 0700, which nginx workers running as another user
cannot traverse. The served tree therefore lives in its own directory under the system temporary
directory, at mode 0711, and is removed at teardown. nginx runs in the foreground (`daemon off`)
with a configuration, pid file, logs and temporary paths of its own, and is stopped by PID.
"""

import hashlib
import http.client
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from conftest import BINARY, Server, free_port, require_tool, wait_until

NGINX = "/usr/sbin/nginx"

# uid and gid that ftpsd runs as in the tests that change users; the Kubernetes manifests use
# the same numbers. No passwd entry is needed for setpriv.
FTPSD_UID = 10001
FTPSD_GID = 10001

HTTP_TIMEOUT = 60
READ_CHUNK = 1024 * 1024


def md5_bytes(data):
    return hashlib.md5(data).hexdigest()


def md5_file(*paths):
    """The md5 of the files' contents, one after the other."""
    digest = hashlib.md5()
    for path in paths:
        with open(path, "rb") as source:
            while chunk := source.read(READ_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def write_random_file(path, size):
    """Writes `size` random bytes to `path` in 1 MiB steps and returns their md5."""
    digest = hashlib.md5()
    with open(path, "wb") as out:
        remaining = size
        while remaining > 0:
            chunk = os.urandom(min(READ_CHUNK, remaining))
            out.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def temp_files(directory):
    """Names of ftpsd's in-flight upload files anywhere under `directory`."""
    found = []
    for parent, _dirs, files in os.walk(directory):
        found.extend(os.path.join(parent, name) for name in files if name.startswith(".ftpsd-upload-"))
    return found


class Nginx:
    """One nginx master process serving `serve_dir` on a free loopback port.

    `user` and `group` name the account of the worker processes, which do all file access. The
    master needs root to switch to them, as in Debian's own service.
    """

    def __init__(self, work_dir, serve_dir, user="www-data", group=None):
        self.work_dir = Path(work_dir)
        self.serve_dir = Path(serve_dir)
        self.user = user
        self.group = group or user
        self.port = free_port()
        self.config_file = self.work_dir / "nginx.conf"
        self.pid_file = self.work_dir / "nginx.pid"
        self.error_log = self.work_dir / "error.log"
        self.process = None

    def _write_config(self):
        temp_paths = "\n".join(
            f"    {kind}_temp_path {self.work_dir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # autoindex is on so that a test can also check the directory listing; nginx skips dot
        # files there. open_file_cache stays off (the default) so every request opens the path
        # anew, as a busy site with a short cache would after the cache expires.
        self.config_file.write_text(
            f"""daemon off;
master_process on;
worker_processes 1;
user {self.user} {self.group};
pid {self.pid_file};
error_log {self.error_log} info;
events {{
    worker_connections 64;
}}
http {{
    access_log {self.work_dir / "access.log"};
{temp_paths}
    types {{
        text/html html;
    }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.serve_dir};
        autoindex on;
    }}
}}
"""
        )

    def start(self, timeout=20):
        if not os.access(NGINX, os.X_OK):
            pytest.fail(f"{NGINX} not found: run .ci/deps to install Debian's nginx-light")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        # -e sends start-up errors to our log instead of the packaged /var/log/nginx/error.log.
        self._output = open(self.work_dir / "nginx.out", "wb")
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.work_dir), "-c", str(self.config_file), "-e", str(self.error_log)],
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, timeout, f"nginx to answer on port {self.port} (log: {self.error_log})")
        return self

    def _answers(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.process.returncode} before it was ready:\n{self.log()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            connection.request("HEAD", "/")
            connection.getresponse().read()
            connection.close()
            return True
        except OSError:
            return False

    def stop(self, timeout=15):
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM is nginx's fast shutdown; the master stops its workers before it exits.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._output.close()

    def log(self):
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def url(self, path):
        """Returns the URL of a path relative to the served directory, percent-encoded as UTF-8,
        which is how nginx decodes it."""
        return f"http://127.0.0.1:{self.port}/{urllib.parse.quote(path)}"

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT)

    def fetch(self, path, connection=None):
        """GETs a path and returns the status, the body's md5 and its length. The body is read
        in chunks, so a 200 MiB body is never held in memory."""
        own = connection is None
        connection = connection or self.connection()
        try:
            connection.request("GET", "/" + urllib.parse.quote(path))
            response = connection.getresponse()
            digest = hashlib.md5()
            length = 0
            while chunk := response.read(READ_CHUNK):
                digest.update(chunk)
                length += len(chunk)
            return response.status, digest.hexdigest(), length
        finally:
            if own:
                connection.close()

    def get(self, path):
        """GETs a small path and returns the status and the whole body."""
        connection = self.connection()
        try:
            connection.request("GET", "/" + urllib.parse.quote(path))
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


class ServerAs(Server):
    """ftpsd started through setpriv as another uid and gid, with a given umask.

    `groups` are the supplementary groups, as Kubernetes adds the pod's fsGroup to the container
    process. The umask is set by a shell that then execs setpriv, which execs ftpsd, so the PID
    that the harness signals is ftpsd's own.
    """

    def __init__(self, root, uid=FTPSD_UID, gid=FTPSD_GID, groups=(), umask=0o077, **options):
        super().__init__(root, **options)
        self.uid = uid
        self.gid = gid
        self.groups = tuple(groups)
        self.umask = umask

    def command(self):
        setpriv = require_tool("setpriv")
        groups = ["--groups=" + ",".join(str(group) for group in self.groups)] if self.groups else ["--clear-groups"]
        return [
            "/bin/sh", "-c", f'umask {self.umask:03o} && exec "$@"', "ftpsd-as-user",
            setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", *groups,
            str(BINARY), "--config", str(self.config_file), *self.extra_args,
        ]

    def hand_over(self):
        """Gives the server's directory, configuration and users file to its uid, as a Secret or
        ConfigMap mount is readable by the pod. ftpsd then creates its certificate directory
        itself."""
        for path in (self.root, self.users_file, self.config_file):
            os.chown(path, self.uid, self.gid)
        os.chmod(self.root, 0o711)


@pytest.fixture
def web_root():
    """A directory that every local user may traverse but not list (mode 0711), removed at
    teardown."""
    root = Path(tempfile.mkdtemp(prefix="ftpsd-web-"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_site(web_root, ftpsd_binary):
    """Factory for an ftpsd whose data directory nginx can serve. It returns (server, nginx),
    both started, and stops both at teardown, nginx first.

    - `as_user`: keyword arguments of ServerAs, to run ftpsd through setpriv.
    - `prepare_data`: called with the data directory path before ftpsd starts.
    - `nginx_user`, `nginx_group`: the account of nginx's worker processes.
    - `data_dir`: replaces the default data directory (root/data).
    - `passive_count`: the size of the passive port range.
    """
    started = []

    def factory(settings=None, users=None, as_user=None, prepare_data=None, nginx_user="www-data", nginx_group=None,
                data_dir=None, passive_count=10):
        root = web_root / f"server{len(started)}"
        root.mkdir(mode=0o711)
        os.chmod(root, 0o711)
        settings = {section: dict(values) for section, values in (settings or {}).items()}
        if data_dir is not None:
            settings.setdefault("storage", {})["data_dir"] = str(data_dir)
        if as_user is None:
            server = Server(root, settings=settings, users=users, passive_count=passive_count)
        else:
            server = ServerAs(root, settings=settings, users=users, passive_count=passive_count, **as_user)
            server.hand_over()
        if data_dir is not None:
            server.data_dir = Path(data_dir)
        if prepare_data is not None:
            prepare_data(server.data_dir)
        nginx = Nginx(web_root / f"nginx{len(started)}", server.data_dir, user=nginx_user, group=nginx_group)
        started.append((server, nginx))
        server.start()
        nginx.start()
        return server, nginx

    yield factory
    for server, nginx in reversed(started):
        nginx.stop()
        server.stop()
