"""Running ftpsd in production, with real clients. The tests cover the admin endpoints
(/healthz, /readyz, /metrics) and the graceful drain on SIGTERM and SIGINT. They also cover live
reload of the certificate and the users file, session fields on every JSON log line, and the
xferlog transfer log."""

import ftplib
import hashlib
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time

import pytest

from conftest import BINARY, PASSWORD, free_port, password_hash, require_tool, wait_until
from ops_helpers import Admin, sample_key, with_admin

MIB = 1024 * 1024


# Helpers


def md5_file(path):
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_random(path, size):
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            chunk = min(remaining, MIB)
            out.write(os.urandom(chunk))
            remaining -= chunk


def upload_in_progress(server, minimum):
    """Returns True once a temporary upload file under the data directory has `minimum` bytes."""
    for path in server.data_dir.rglob(".ftpsd-upload-*"):
        try:
            if path.stat().st_size >= minimum:
                return True
        except FileNotFoundError:
            pass
    return False


def start_lftp_upload(server, source, name, rate):
    """Starts a rate-limited lftp upload in the background; returns the process."""
    lftp = require_tool("lftp")
    settings = (
        "set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:verify-certificate no; "
        f"set net:max-retries 1; set net:timeout 30; set cmd:fail-exit true; set net:limit-rate {rate}; "
    )
    return subprocess.Popen(
        [lftp, "-u", f"alice,{PASSWORD}", "-p", str(server.port), "-e", f"{settings}put {source} -o {name}; bye", server.host],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )


def tls_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served_serial(server):
    """Returns the serial of the certificate that a new TLS session gets, as uppercase hex."""
    client = ftplib.FTP_TLS(context=tls_context(), timeout=10)
    client.connect(server.host, server.port)
    client.auth()
    serial = der_serial(client.sock.getpeercert(binary_form=True))
    client.close()
    return serial


def der_serial(der):
    result = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-noout", "-serial"], input=der, capture_output=True, timeout=10, check=True
    )
    return result.stdout.decode().strip().split("=", 1)[1].upper()


def file_serial(path):
    result = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(path)], capture_output=True, timeout=10, check=True)
    return result.stdout.decode().strip().split("=", 1)[1].upper()


def generate_pair(directory):
    """Generates a self-signed pair with ftpsd's own generator (rcgen) in `directory`."""
    directory.mkdir(parents=True)
    config = directory / "gen.toml"
    config.write_text(f'[tls]\ngenerated_dir = "{directory}"\n[storage]\ndata_dir = "{directory / "data"}"\n')
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FTPSD_")}
    result = subprocess.run(
        [str(BINARY), "--config", str(config), "check-config"], capture_output=True, timeout=30, cwd=directory, env=environment
    )
    assert result.returncode == 0, result.stderr.decode()
    return directory / "cert.pem", directory / "key.pem"


class KubeletVolume:
    """A directory laid out the way the kubelet mounts a Secret: the files are symlinks through
    `..data`, which points at a timestamped directory and is swapped with one rename."""

    def __init__(self, root):
        self.root = root
        self.root.mkdir()
        self.version = 0

    def publish(self, files):
        """Writes {name: bytes} as a new version and swaps `..data` to it atomically."""
        self.version += 1
        version_dir = self.root / f"..2025_01_01_00_00_0{self.version}.000000000"
        version_dir.mkdir()
        for name, content in files.items():
            (version_dir / name).write_bytes(content)
        temporary = self.root / "..data_tmp"
        temporary.symlink_to(version_dir.name)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.rename(temporary, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        if old:
            for path in (self.root / old).iterdir():
                path.unlink()
            (self.root / old).rmdir()


# Admin endpoints


def test_healthz_and_readyz_when_serving(make_server):
    server, admin = with_admin(make_server)

    assert admin.get("/healthz") == (200, "ok\n")
    status, body = admin.get("/readyz")
    assert status == 200, body
    lines = body.splitlines()
    assert len(lines) == 4, body
    assert all(line.startswith("ok: ") for line in lines), body
    assert f"control listener on port {server.port} is up" in body
    assert "is writable" in body
    assert "not draining" in body
    assert admin.get("/nothing")[0] == 404


def test_readyz_fails_while_data_dir_is_unusable(make_server):
    server, admin = with_admin(make_server)
    moved = server.root / "data-moved"
    os.rename(server.data_dir, moved)
    # A file where the directory was: the write probe fails for root too.
    server.data_dir.write_text("not a directory")

    status, body = admin.get("/readyz")
    assert status == 503, body
    assert f"failed: data directory {server.data_dir} is not writable" in body
    assert admin.get("/healthz")[0] == 200

    server.data_dir.unlink()
    os.rename(moved, server.data_dir)
    assert admin.get("/readyz")[0] == 200


def test_probe_requests_log_at_debug(make_server):
    server, admin = with_admin(make_server)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert admin.get(path)[0] == 200
    client = server.ftps()
    client.quit()
    server.wait_for_log(r"session ended user=\"?alice")
    assert "admin request" not in server.log()
    assert "/healthz" not in server.log()

    debug_port = free_port()
    debug = make_server(
        settings={"admin": {"listen": f"127.0.0.1:{debug_port}"}}, env={"RUST_LOG": "info,ftpsd::server::admin=debug"}
    ).start()
    assert Admin(debug_port).get("/healthz")[0] == 200
    debug.wait_for_log(r"DEBUG.*admin request.*path=\"?/healthz.*status=200")


def test_admin_port_in_use_stops_the_start(make_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = make_server(settings={"admin": {"listen": f"127.0.0.1:{port}"}})
        process = subprocess.run(server.command(), capture_output=True, timeout=30, cwd=server.root)
    assert process.returncode == 1
    assert f"admin.listen = 127.0.0.1:{port}" in process.stderr.decode(), process.stderr.decode()


# Metrics


def test_metrics_count_transfers_bytes_and_sessions(make_server):
    server, admin = with_admin(make_server)
    payload = os.urandom(300_001)
    # The fixture's readiness check was a session already.
    sessions_before = admin.metric("ftpsd_sessions_total")
    engine_sessions_before = admin.metric("ftp_sessions_count")

    client = server.ftps()
    client.storbinary("STOR counted.bin", io.BytesIO(payload))
    chunks = []
    client.retrbinary("RETR counted.bin", chunks.append)
    assert admin.metric("ftpsd_sessions_active") == 1
    client.quit()
    assert b"".join(chunks) == payload

    admin.wait_for_metric("ftpsd_sessions_active", 0)
    metrics = admin.metrics()
    expected = [
        ("ftpsd_transfer_bytes_total", {"direction": "upload"}, 300_001),
        ("ftpsd_transfer_bytes_total", {"direction": "download"}, 300_001),
        ("ftpsd_transfers_total", {"direction": "upload", "result": "ok"}, 1),
        ("ftpsd_transfers_total", {"direction": "download", "result": "ok"}, 1),
        ("ftpsd_transfer_duration_seconds_count", {"direction": "upload"}, 1),
        ("ftpsd_sessions_total", {}, sessions_before + 1),
        ("ftpsd_logins_total", {"result": "success"}, 1),
        # libunftp's own metrics come from the same registry.
        ("ftp_backend_write_bytes", {}, 300_001),
        ("ftp_backend_read_bytes", {}, 300_001),
        ("ftp_sessions_count", {}, engine_sessions_before + 1),
    ]
    for name, labels, value in expected:
        assert metrics.get(sample_key(name, labels)) == value, (name, labels, metrics.get(sample_key(name, labels)))
    build = [key for key in metrics if key[0] == "ftpsd_build_info"]
    assert build == [("ftpsd_build_info", (("libunftp", "0.24.0"), ("version", "0.1.0")))], build


def test_metrics_count_logins_by_result(make_server):
    server, admin = with_admin(make_server)

    server.ftps().quit()
    with pytest.raises(ftplib.error_perm, match="^530"):
        server.ftps(password="wrong")
    with pytest.raises(ftplib.error_perm, match="^530"):
        server.ftps(user="mallory")
    with socket.create_connection((server.host, server.port), timeout=10) as plain:
        reader = plain.makefile("rb")
        assert reader.readline().startswith(b"220")
        plain.sendall(b"USER alice\r\n")
        assert reader.readline()[:1] == b"5"

    for result, count in {"success": 1, "bad_password": 1, "unknown_user": 1, "tls_missing": 1, "locked_out": 0}.items():
        admin.wait_for_metric("ftpsd_logins_total", count, result=result)


def test_lockout_is_counted(make_server):
    server, admin = with_admin(make_server, settings={"auth": {"max_failed_logins": 2, "lockout_secs": 60}})
    for _ in range(2):
        with pytest.raises(ftplib.error_perm, match="^530"):
            server.ftps(password="wrong")
    # The right password now fails too: alice is locked out from this address.
    with pytest.raises(ftplib.error_perm, match="^530"):
        server.ftps()
    admin.wait_for_metric("ftpsd_logins_total", 1, result="locked_out")
    assert admin.metric("ftpsd_logins_total", result="bad_password") == 2
    assert admin.metric("ftpsd_logins_total", result="success") == 0
    # bob has no failed logins and is not locked.
    server.ftps(user="bob").quit()


def test_metrics_passive_ports_in_use(make_server):
    server, admin = with_admin(make_server)
    assert admin.metric("ftpsd_passive_ports_pool_size") == 10
    assert admin.metric("ftpsd_passive_ports_in_use") == 0

    client = server.ftps()
    client.sendcmd("PASV")
    assert admin.metric("ftpsd_passive_ports_in_use") == 1
    client.quit()
    admin.wait_for_metric("ftpsd_passive_ports_in_use", 0)


def pasv_port(client):
    reply = client.sendcmd("PASV")
    numbers = [int(part) for part in re.search(r"\((\d+(?:,\d+){5})\)", reply).group(1).split(",")]
    return numbers[4] * 256 + numbers[5]


def test_data_connection_failures_by_reason(make_server):
    server, admin = with_admin(make_server)

    # A data connection from another address than the control connection.
    client = server.ftps()
    port = pasv_port(client)
    with socket.socket() as intruder:
        intruder.bind(("127.0.0.2", 0))
        intruder.connect((server.host, port))
        admin.wait_for_metric("ftpsd_data_connection_failures_total", 1, reason="address_mismatch")
    client.close()

    # Garbage in place of a TLS ClientHello on the data connection.
    client = server.ftps()
    port = pasv_port(client)
    with socket.create_connection((server.host, port), timeout=10) as data:
        assert client.sendcmd("STOR garbage.bin").startswith("150")
        data.sendall(b"this is not a TLS ClientHello\r\n" * 64)
        admin.wait_for_metric("ftpsd_data_connection_failures_total", 1, reason="tls_handshake")
    assert admin.metric("ftpsd_tls_handshake_failures_total", channel="data") == 1
    client.close()

    # A passive port that the client never connects to expires after libunftp's 15 s.
    client = server.ftps()
    pasv_port(client)
    admin.wait_for_metric("ftpsd_data_connection_failures_total", 1, reason="timeout", timeout=40)
    client.close()


def test_control_tls_handshake_failure_is_counted(make_server):
    server, admin = with_admin(make_server)
    with socket.create_connection((server.host, server.port), timeout=10) as plain:
        reader = plain.makefile("rb")
        assert reader.readline().startswith(b"220")
        plain.sendall(b"AUTH TLS\r\n")
        assert reader.readline().startswith(b"234")
        plain.sendall(b"this is not a TLS ClientHello\r\n" * 64)
        admin.wait_for_metric("ftpsd_tls_handshake_failures_total", 1, channel="control")


def test_certificate_expiry_metric_matches_the_file(make_server):
    server, admin = with_admin(make_server)
    end = subprocess.run(
        ["openssl", "x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in", str(server.cert_file)],
        capture_output=True, check=True, timeout=10,
    ).stdout.decode().strip().split("=", 1)[1]
    expected = subprocess.run(["date", "-u", "-d", end, "+%s"], capture_output=True, check=True, timeout=10).stdout
    assert admin.metric("ftpsd_certificate_expiry_timestamp_seconds") == int(expected)


# Graceful drain


def test_sigterm_drains_an_upload_in_flight(make_server, tmp_path):
    server, admin = with_admin(make_server, settings={"server": {"drain_timeout_secs": 120}})
    source = tmp_path / "big.bin"
    write_random(source, 200 * MIB)
    # 40 MB/s keeps the upload in flight for about 5 s, so the checks below run during it.
    upload = start_lftp_upload(server, source, "big.bin", 40_000_000)
    wait_until(lambda: upload_in_progress(server, 20 * MIB), 60, "20 MiB of the upload to arrive")

    server.process.send_signal(signal.SIGTERM)

    # The signal arrives asynchronously; "at once" means within moments, not before this returns.
    wait_until(lambda: admin.get("/readyz")[0] == 503, 5, "/readyz to return 503")
    status, body = admin.get("/readyz")
    assert status == 503, body
    assert "failed: draining" in body
    with pytest.raises(ftplib.error_temp, match="^421"):
        server.ftps()
    assert upload.poll() is None, "the upload ended before the drain checks ran"

    out, err = upload.communicate(timeout=180)
    assert upload.returncode == 0, err.decode(errors="replace") + server.log()[-4000:]
    assert server.process.wait(timeout=60) == 0
    assert md5_file(server.data_dir / "alice" / "big.bin") == md5_file(source)
    assert re.search(r"draining.*sessions=1", server.log())
    assert re.search(r"every session ended before the drain deadline.*transfers_finished=1", server.log()), server.log()[-4000:]


def test_idle_session_closes_at_once_on_sigint(make_server):
    server = make_server(settings={"server": {"drain_timeout_secs": 60}}).start()
    client = server.ftps()
    started = time.monotonic()

    server.process.send_signal(signal.SIGINT)

    assert server.process.wait(timeout=15) == 0
    assert time.monotonic() - started < 10, "an idle session must not wait for the drain deadline"
    # The server sent 421 without a command, as it does for an idle timeout.
    with pytest.raises(ftplib.error_temp, match="^421"):
        client.getresp()
    client.close()


def test_drain_deadline_closes_the_rest_and_exits_zero(make_server, tmp_path):
    server = make_server(settings={"server": {"drain_timeout_secs": 2}}).start()
    source = tmp_path / "slow.bin"
    write_random(source, 50 * MIB)
    upload = start_lftp_upload(server, source, "slow.bin", 1_000_000)
    wait_until(lambda: upload_in_progress(server, 1), 30, "the upload to start")
    started = time.monotonic()

    server.process.send_signal(signal.SIGTERM)

    assert server.process.wait(timeout=20) == 0
    assert time.monotonic() - started < 10
    upload.communicate(timeout=60)
    assert upload.returncode != 0, "the upload cannot have completed at 1 MB/s"
    assert re.search(r"drain deadline passed.*sessions_closed=1", server.log()), server.log()[-3000:]
    assert not (server.data_dir / "alice" / "slow.bin").exists()


def test_second_signal_exits_at_once(make_server, tmp_path):
    server = make_server(settings={"server": {"drain_timeout_secs": 120}}).start()
    source = tmp_path / "slow.bin"
    write_random(source, 50 * MIB)
    upload = start_lftp_upload(server, source, "slow.bin", 1_000_000)
    wait_until(lambda: upload_in_progress(server, 1), 30, "the upload to start")

    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log(r"draining")
    assert server.process.poll() is None, "the first signal must wait for the upload"
    server.process.send_signal(signal.SIGTERM)

    assert server.process.wait(timeout=10) == 128 + signal.SIGTERM
    server.wait_for_log(r"second signal")
    upload.kill()
    upload.communicate(timeout=10)


# Live reload


def test_certificate_swap_like_kubelet_serves_the_new_one(make_server, tmp_path):
    pairs = [generate_pair(tmp_path / name) for name in ("first", "second", "third")]
    volume = KubeletVolume(tmp_path / "tls")
    volume.publish({"tls.crt": pairs[0][0].read_bytes(), "tls.key": pairs[0][1].read_bytes()})
    server, admin = with_admin(
        make_server,
        settings={"tls": {"cert_file": str(volume.root / "tls.crt"), "key_file": str(volume.root / "tls.key")}},
    )
    assert served_serial(server) == file_serial(pairs[0][0])
    open_session = server.ftps()

    # Two renewals: the second one shows that the watch survives the first swap.
    for number, (cert, key) in enumerate(pairs[1:], start=1):
        volume.publish({"tls.crt": cert.read_bytes(), "tls.key": key.read_bytes()})
        wait_until(lambda: served_serial(server) == file_serial(cert), 15, f"new TLS sessions to get certificate {number + 1}")
        assert admin.metric("ftpsd_reloads_total", kind="certificate", result="ok") == number

    assert der_serial(open_session.sock.getpeercert(binary_form=True)) == file_serial(pairs[0][0])
    open_session.storbinary("STOR after-swap.txt", io.BytesIO(b"still here"))
    assert open_session.voidcmd("NOOP").startswith("200")
    open_session.quit()
    server.wait_for_log(r"certificate reloaded")
    expiry = subprocess.run(
        ["openssl", "x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in", str(pairs[2][0])],
        capture_output=True, check=True, timeout=10,
    ).stdout.decode().strip().split("=", 1)[1]
    expected = subprocess.run(["date", "-u", "-d", expiry, "+%s"], capture_output=True, check=True, timeout=10).stdout
    assert admin.metric("ftpsd_certificate_expiry_timestamp_seconds") == int(expected)


def test_bad_certificate_pair_keeps_the_old_one(make_server, tmp_path):
    first_cert, first_key = generate_pair(tmp_path / "first")
    second_cert, _ = generate_pair(tmp_path / "second")
    volume = KubeletVolume(tmp_path / "tls")
    volume.publish({"tls.crt": first_cert.read_bytes(), "tls.key": first_key.read_bytes()})
    server, admin = with_admin(
        make_server,
        settings={"tls": {"cert_file": str(volume.root / "tls.crt"), "key_file": str(volume.root / "tls.key")}},
    )

    # The new certificate with the old key: a pair that does not match.
    volume.publish({"tls.crt": second_cert.read_bytes(), "tls.key": first_key.read_bytes()})

    server.wait_for_log(r"ERROR.*certificate reload failed; keeping the current certificate.*does not match")
    assert served_serial(server) == file_serial(first_cert)
    assert admin.metric("ftpsd_reloads_total", kind="certificate", result="failed") == 1
    server.ftps().quit()


def users_toml(users):
    lines = []
    for name in users:
        lines += ["[[users]]", f'name = "{name}"', f'password_hash = "{password_hash()}"', f'home = "{name}"', ""]
    return "\n".join(lines)


def replace_file(path, text):
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.rename(temporary, path)


def test_users_file_change_reloads_users(make_server):
    server, admin = with_admin(make_server)
    with pytest.raises(ftplib.error_perm, match="^530"):
        server.ftps(user="carol")

    replace_file(server.users_file, users_toml(["alice", "carol"]))

    server.wait_for_log(r"users reloaded.*trigger=\"?file change")
    server.ftps(user="carol").quit()
    assert (server.data_dir / "carol").is_dir()
    with pytest.raises(ftplib.error_perm, match="^530"):
        server.ftps(user="bob")
    assert admin.metric("ftpsd_reloads_total", kind="users", result="ok") == 1


def test_bad_users_file_keeps_the_old_users(make_server):
    server, admin = with_admin(make_server)
    open_session = server.ftps()

    replace_file(server.users_file, "[[users]]\nname = \"carol\"\npassword = \"plain text\"\n")

    server.wait_for_log(r"ERROR.*users reload failed; keeping the current users.*unknown field")
    admin.wait_for_metric("ftpsd_reloads_total", 1, kind="users", result="failed")
    server.ftps(user="bob").quit()
    assert open_session.voidcmd("NOOP").startswith("200")
    open_session.quit()


def test_sighup_reloads_users(make_server, tmp_path):
    server = make_server().start()
    # Written through a hard link in another directory: the file watcher on the users file's
    # directory does not see it, so only SIGHUP can make the server read it.
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.link(server.users_file, other / "users.toml")
    with open(other / "users.toml", "r+") as handle:
        handle.truncate(0)
        handle.write(users_toml(["alice", "dave"]))

    server.process.send_signal(signal.SIGHUP)

    server.wait_for_log(r"users reloaded.*trigger=\"?SIGHUP")
    server.ftps(user="dave").quit()


# Logs


def test_json_logs_carry_session_fields_on_every_line(make_server):
    server = make_server(settings={"log": {"format": "json"}}).start()
    client = server.ftps()
    client.storbinary("STOR json.bin", io.BytesIO(b"x" * 1000))
    client.retrbinary("RETR json.bin", lambda chunk: None)
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.retrbinary("RETR missing.bin", lambda chunk: None)
    client.quit()
    # The fixture's readiness check ended a session too, one without a user.
    server.wait_for_log(r'"message":"session ended".*"user":"alice"')

    lines = [json.loads(line) for line in server.log().splitlines()]
    session_id = next(line for line in lines if line["message"] == "login succeeded")["session_id"]
    session_lines = [line for line in lines if line.get("session_id") == session_id]
    messages = [line["message"] for line in session_lines]
    for expected in ("session started", "login succeeded", "transfer finished", "session ended"):
        assert expected in messages, messages
    assert messages.count("transfer finished") == 2, messages
    for line in session_lines:
        assert line["peer"] == "127.0.0.1", line
    for line in session_lines[messages.index("login succeeded"):]:
        assert line["user"] == "alice", line
    # Every line of the engine and of the storage belongs to a session, the fixture's readiness
    # check (connect, read 220, close) included.
    for line in lines:
        if line["target"] in ("ftpsd::engine", "ftpsd::storage"):
            assert line.get("session_id"), line
            assert line.get("peer") == "127.0.0.1", line


def test_xferlog_lines_and_reopen_on_sighup(make_server, tmp_path):
    xferlog = tmp_path / "xferlog"
    server = make_server(settings={"log": {"xferlog_file": str(xferlog)}}).start()
    client = server.ftps()
    client.storbinary("STOR report 2025.csv", io.BytesIO(b"a,b\n" * 1000))
    client.retrbinary("RETR report 2025.csv", lambda chunk: None)
    client.quit()

    wait_until(lambda: len(xferlog.read_text().splitlines()) == 2, 10, "two xferlog lines")
    upload, download = [line.split() for line in xferlog.read_text().splitlines()]
    assert len(upload) == 18, upload
    weekday, month, day, clock, year = upload[:5]
    assert weekday in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"), upload
    assert month in ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), upload
    assert day.isdigit(), upload
    assert re.fullmatch(r"\d\d:\d\d:\d\d", clock), upload
    assert year.isdigit(), upload
    assert int(upload[5]) >= 1, upload
    assert upload[6:] == ["127.0.0.1", "4000", "/report_2025.csv", "b", "_", "i", "r", "alice", "ftp", "0", "*", "c"]
    assert download[6:] == ["127.0.0.1", "4000", "/report_2025.csv", "b", "_", "o", "r", "alice", "ftp", "0", "*", "c"]

    rotated = tmp_path / "xferlog.1"
    os.rename(xferlog, rotated)
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"transfer log reopened")
    client = server.ftps()
    client.storbinary("STOR after.bin", io.BytesIO(b"x"))
    client.quit()
    wait_until(lambda: xferlog.exists() and xferlog.read_text().strip(), 10, "a line in the new xferlog")
    assert "/after.bin" in xferlog.read_text()
    assert len(rotated.read_text().splitlines()) == 2


def test_xferlog_marks_an_interrupted_download_incomplete(make_server, tmp_path):
    xferlog = tmp_path / "xferlog"
    server = make_server(settings={"log": {"xferlog_file": str(xferlog)}}).start()
    (server.data_dir / "alice" / "large.bin").write_bytes(os.urandom(20 * MIB))
    client = server.ftps()
    received = []

    def stop_early(chunk):
        received.append(chunk)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        client.retrbinary("RETR large.bin", stop_early)
    client.close()

    wait_until(lambda: xferlog.exists() and xferlog.read_text().strip(), 20, "the xferlog line")
    fields = xferlog.read_text().split()
    assert fields[8] == "/large.bin", fields
    assert fields[11] == "o", fields
    assert fields[-1] == "i", fields


def test_unwritable_xferlog_stops_the_start(tmp_path):
    result = subprocess.run(
        [str(BINARY), "--data-dir", str(tmp_path / "data"), "check-config"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("FTPSD_")}, "FTPSD_LOG__XFERLOG_FILE": str(tmp_path / "missing" / "xferlog")},
        capture_output=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "log.xferlog_file" in result.stderr.decode(), result.stderr.decode()
