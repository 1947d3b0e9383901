#!/usr/bin/env python3
"""Throughput and login latency of the release binary on loopback, against the targets in
bench/README.md. Run with `python3 bench/throughput.py` after `make build`; exits 1 when a target
is missed. Not part of the test suite: timings depend on the machine."""

import argparse
import concurrent.futures
import hashlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from conftest import PASSWORD, Server, require_tool  # noqa: E402

MIB = 1024 * 1024

# Targets on loopback. bench/README.md explains the choice of each.
TARGETS = {
    "upload_mib_s": 100.0,
    "download_mib_s": 100.0,
    "parallel_mib_s": 100.0,
    "login_ms_median": 100.0,
}


def timed(action):
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def single_stream(server, work, size_mib):
    curl = require_tool("curl")
    source = work / "single.bin"
    with open(source, "wb") as out:
        for _ in range(size_mib):
            out.write(os.urandom(MIB))
    base = [curl, "--silent", "--show-error", "--ssl-reqd", "--insecure", "--user", f"alice:{PASSWORD}"]
    upload = timed(lambda: subprocess.run([*base, "--upload-file", str(source), server.url("single.bin")], check=True, timeout=600))
    copy = work / "single.copy"
    download = timed(lambda: subprocess.run([*base, server.url("single.bin"), "-o", str(copy)], check=True, timeout=600))
    if hashlib.md5(copy.read_bytes()).digest() != hashlib.md5(source.read_bytes()).digest():
        raise SystemExit("single-stream download differs from the upload")
    return size_mib / upload, size_mib / download


def parallel(server, sessions, size_mib):
    payload = os.urandom(size_mib * MIB)

    def round_trip(index):
        client = server.ftps()
        client.storbinary(f"STOR parallel{index}.bin", io.BytesIO(payload))
        received = bytearray()
        client.retrbinary(f"RETR parallel{index}.bin", received.extend)
        client.quit()
        if bytes(received) != payload:
            raise SystemExit(f"session {index}: download differs from the upload")

    with concurrent.futures.ThreadPoolExecutor(max_workers=sessions) as pool:
        elapsed = timed(lambda: list(pool.map(round_trip, range(sessions))))
    return 2 * sessions * size_mib / elapsed


def logins(server, count):
    durations = []
    for _ in range(count):
        started = time.perf_counter()
        client = server.ftps()
        client.quit()
        durations.append((time.perf_counter() - started) * 1000)
    return statistics.median(durations)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256, help="size of the single-stream file in MiB")
    parser.add_argument("--sessions", type=int, default=20, help="parallel sessions")
    parser.add_argument("--session-mib", type=int, default=16, help="MiB each parallel session uploads and downloads")
    parser.add_argument("--logins", type=int, default=50, help="sequential logins timed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ftpsd-bench-") as temp:
        work = Path(temp)
        (work / "server").mkdir()
        server = Server(work / "server", passive_count=max(40, 2 * args.sessions))
        server.start()
        try:
            upload, download = single_stream(server, work, args.size_mib)
            results = {
                "upload_mib_s": upload,
                "download_mib_s": download,
                "parallel_mib_s": parallel(server, args.sessions, args.session_mib),
                "login_ms_median": logins(server, args.logins),
            }
        finally:
            server.stop()

    missed = 0
    for name, value in results.items():
        target = TARGETS[name]
        met = value <= target if name.endswith("_ms_median") else value >= target
        missed += not met
        print(f"{name:18} {value:10.1f}   target {'<=' if name.endswith('_ms_median') else '>='} {target:g}   {'met' if met else 'MISSED'}")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
