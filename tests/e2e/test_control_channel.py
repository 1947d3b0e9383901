"""Control-channel faults of a bare libunftp 0.24.0 server, driven with raw sockets, ftplib and lftp.

Each test checks exact reply codes and has a time bound on every wait. The fixes are the patches
0110 to 0114 under patches/libunftp/.
"""

import ftplib
import os
import socket
import ssl
import time

import pytest

from dc_helpers import TIMEOUT, client_tls_context, connect, read_reply, send_command

# How long the server waits for the TLS handshake after AUTH TLS, in seconds (patch 0112).
CONTROL_TLS_HANDSHAKE_TIMEOUT = 15

# The maximum length of a command line, in bytes with the CRLF (patch 0113).
MAX_LINE_LENGTH = 4096


class RawControl:
    """A control connection on a plain socket, for bytes that ftplib does not send."""

    def __init__(self, server):
        self.sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
        self.buffer = b""
        assert self.reply().startswith("220")

    def send(self, data):
        self.sock.sendall(data)

    def reply(self, timeout=TIMEOUT):
        """Reads one reply line within `timeout` seconds; returns "" when the server closed."""
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {timeout}s; received so far: {self.buffer[:200]!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(4096)
            if not chunk:
                return ""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode(errors="replace")

    def close(self):
        self.sock.close()


def wait_closed(sock, timeout):
    """Reads until the peer closes the connection; returns how long that took, in seconds."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the connection is still open after {timeout}s")
        sock.settimeout(remaining)
        try:
            if not sock.recv(4096):
                break
        except (ConnectionResetError, ssl.SSLError):
            break
        except TimeoutError:
            continue
    return time.monotonic() - started


# Commands that fail to parse, and the reply each gets.
UNPARSABLE_COMMANDS = [
    (b"STOR", "501"),
    (b"PROT X", "501"),
    (b"REST abc", "501"),
    (b"PBSZ abc", "501"),
    (b"MODE Z", "501"),
    (b"NOOP extra args", "501"),
    (b"NO\xffOP", "500"),
]


@pytest.mark.parametrize(("command", "code"), UNPARSABLE_COMMANDS, ids=[c.decode(errors="replace") for c, _ in UNPARSABLE_COMMANDS])
def test_parse_error_keeps_session(server, command, code):
    client = connect(server)

    # Sent as bytes, because ftplib would encode the invalid UTF-8 itself.
    client.sock.sendall(command + b"\r\n")
    assert read_reply(client).startswith(code)

    assert send_command(client, "NOOP").startswith("200")
    assert send_command(client, "PWD").startswith("257")
    client.quit()


def test_parse_error_before_login(server):
    control = RawControl(server)

    control.send(b"MODE Z\r\n")
    assert control.reply().startswith("501")
    control.send(b"NOOP\r\n")
    assert control.reply().startswith("200")
    control.close()


def test_corrupt_tls_record_ends_session(server):
    # An I/O error on the control connection still ends the session: after AUTH TLS, bytes that
    # are not a TLS record fail to decrypt.
    control = RawControl(server)
    control.send(b"AUTH TLS\r\n")
    assert control.reply().startswith("234")
    tls = client_tls_context().wrap_socket(control.sock)
    tls.sendall(b"NOOP\r\n")
    assert tls.recv(4096).startswith(b"200")

    raw = socket.socket(fileno=os.dup(tls.fileno()))
    raw.sendall(b"\x17\x03\x03\x00\x10" + b"\x00" * 16)
    raw.close()
    assert wait_closed(tls, TIMEOUT) < TIMEOUT
    tls.close()


@pytest.mark.parametrize("command", ["LIST", "NLST", "MLSD"])
def test_listing_missing_directory(server, command):
    client = connect(server)

    # ftplib reads the listing to the end of the stream and then waits for the TLS close.
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        client.retrlines(f"{command} missing", lambda line: None)

    assert send_command(client, "NOOP").startswith("200")
    (server.data_dir / "alice" / "present.txt").write_bytes(b"present\n")
    assert "present.txt" in client.nlst()
    client.quit()


def test_auth_tls_without_handshake(server):
    control = RawControl(server)
    control.send(b"AUTH TLS\r\n")
    assert control.reply().startswith("234")

    # No ClientHello follows: the server closes the connection when its handshake limit expires.
    waited = wait_closed(control.sock, CONTROL_TLS_HANDSHAKE_TIMEOUT + 10)
    assert waited > CONTROL_TLS_HANDSHAKE_TIMEOUT - 2
    assert server.wait_for_log("no complete TLS handshake")
    control.close()


def user_line(length):
    """A USER command line of exactly `length` bytes, CRLF included."""
    return b"USER " + b"a" * (length - len(b"USER \r\n")) + b"\r\n"


def test_command_line_at_limit(server):
    control = RawControl(server)

    # Before AUTH TLS, ftpsd replies 534 to USER, which shows that the line was read.
    control.send(user_line(MAX_LINE_LENGTH))
    assert control.reply().startswith("534")
    control.send(user_line(MAX_LINE_LENGTH + 1))
    assert control.reply().startswith("500")

    control.send(b"NOOP\r\n")
    assert control.reply().startswith("200")
    control.close()


def test_command_line_of_16_mib(server):
    control = RawControl(server)

    control.send(user_line(16 * 1024 * 1024) + b"NOOP\r\n")
    assert control.reply().startswith("500")
    assert control.reply().startswith("200")

    # The session goes on, with nothing of the long line left.
    control.send(b"USER alice\r\n")
    assert control.reply().startswith("534")
    control.close()


def test_command_line_without_end(make_server):
    idle_timeout = 3
    server = make_server(settings={"server": {"idle_timeout_secs": idle_timeout}}).start()
    control = RawControl(server)

    # 32 MiB with no line end: one 500 as soon as the line passes the limit, and the rest is
    # dropped as it arrives.
    control.send(b"USER " + b"a" * (32 * 1024 * 1024))
    assert control.reply().startswith("500")

    # A line that never ends: the idle session timeout closes the session, with libunftp's 221.
    assert control.reply(timeout=idle_timeout + TIMEOUT).startswith("221")
    assert control.reply() == ""
    control.close()


def test_mkd_existing_directory(server):
    client = connect(server)
    assert client.mkd("made") == "/made"

    with pytest.raises(ftplib.error_perm) as raised:
        client.mkd("made")
    assert str(raised.value) == '550 "/made" already exists'
    assert send_command(client, "NOOP").startswith("200")
    client.quit()

    # lftp prints the server's reply text for a failed mkdir.
    result = server.lftp("mkdir made", check=False)
    assert result.returncode != 0
    assert b"already exists" in result.stderr, result.stderr
