"""Helpers for the operations and monitoring tests: the admin endpoints of a server and the
Prometheus text format."""

import re
import urllib.error
import urllib.request

from conftest import free_port, wait_until


def http_get(url, timeout=10):
    """Returns (status, body) of a GET, for error statuses too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Admin:
    """The admin endpoints of one server."""

    def __init__(self, port):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path):
        return http_get(self.base + path)

    def metrics(self):
        status, text = self.get("/metrics")
        assert status == 200, text
        return parse_metrics(text)

    def metric(self, name, **labels):
        """Returns the sample's value, or None when the series is not exported."""
        return self.metrics().get(sample_key(name, labels))

    def wait_for_metric(self, name, expected, timeout=30, **labels):
        wait_until(
            lambda: self.metric(name, **labels) == expected,
            timeout,
            f"{name}{labels} == {expected} (now {self.metric(name, **labels)})",
        )


def sample_key(name, labels):
    return name, tuple(sorted(labels.items()))


def parse_metrics(text):
    """Parses the Prometheus text format into {(name, ((label, value), ...)): value}."""
    samples = {}
    pattern = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = pattern.match(line)
        assert match, f"not a sample line: {line!r}"
        name, label_text, value = match.groups()
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text or ""))
        samples[sample_key(name, labels)] = float(value)
    return samples


def with_admin(make_server, settings=None, **options):
    """Starts a server with the admin listener on a free loopback port."""
    port = free_port()
    merged = {"admin": {"listen": f"127.0.0.1:{port}"}}
    for section, values in (settings or {}).items():
        merged.setdefault(section, {}).update(values)
    server = make_server(settings=merged, **options).start()
    admin = Admin(port)
    wait_until(lambda: admin.get("/readyz")[0] == 200, 20, "/readyz to answer 200")
    return server, admin
