"""Fixtures and client helpers for the data-channel tests in test_data_channel.py."""

import ftplib
import socket
import ssl

import pytest

from conftest import PASSWORD

# Bound for every reply and socket operation that has no tighter bound of its own, in seconds.
TIMEOUT = 10

# The passive modes that ftpsd accepts. `pooled` (the whole range bound at start) is rejected at
# start-up until its cross-session reservation fault is patched; test_pooled_mode_is_refused
# checks that.
PASSIVE_MODES = ["per-session"]


@pytest.fixture(params=PASSIVE_MODES)
def server_in_each_mode(request, make_server):
    """A running ftpsd, once per passive mode."""
    return make_server(settings={"passive": {"mode": request.param}}).start()


def client_tls_context():
    # The server's certificate is generated per test and self-signed.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect(server, protect_data=True, user="alice", password=PASSWORD):
    """Returns an ftplib client logged in over TLS, which has also sent PROT P when protect_data is set."""
    client = ftplib.FTP_TLS(context=client_tls_context(), timeout=TIMEOUT)
    client.connect(server.host, server.port)
    client.auth()
    client.login(user, password)
    if protect_data:
        client.prot_p()
    return client


def read_reply(client, timeout=TIMEOUT):
    """Reads one reply, or raises TimeoutError when none arrives within `timeout` seconds."""
    client.sock.settimeout(timeout)
    try:
        return client.getmultiline()
    finally:
        client.sock.settimeout(TIMEOUT)


def send_command(client, command, timeout=TIMEOUT):
    """Sends one command and returns its first reply, without ftplib's checks on the code."""
    client.putcmd(command)
    return read_reply(client, timeout)


def pasv_port(client):
    """Sends PASV, checks for 227 and returns the port it offers."""
    reply = send_command(client, "PASV")
    assert reply.startswith("227"), reply
    return ftplib.parse227(reply)[1]


def close_without_tls_close(tls_socket):
    """Closes the TCP connection under a TLS socket without sending close_notify."""
    socket.socket(fileno=tls_socket.detach()).close()


def read_until_closed(connection):
    """Reads until the peer closes the connection and returns the bytes read."""
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
