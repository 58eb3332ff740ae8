#!/usr/bin/env python3
"""Slow readers against tether: what they cost in memory, and whether it
comes back.

Starts a worker that answers 1 MiB to every GET (Python, threaded) and one
tether per binary given, then for each binary in turn: opens N client
connections with a 4 KiB receive buffer, asks each for the 1 MiB body and
reads 1 KiB per second; samples tether's RSS before, at the peak (after
`--hold` seconds), and after the clients have gone; then a second round,
to show the freed memory is reused rather than grown again. Loopback only,
bounded in count and time; every process it starts is stopped.

    cargo build --release
    python3 bench/slow_readers.py target/release/tether [other/tether ...]
"""

import argparse
import base64
import http.server
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

BODY = b"x" * (1 << 20)


class Big(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b'{"ok":true}' if self.path.startswith("/health") else BODY
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_port(port, within=10.0):
    end = time.time() + within
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def attack(port, n, hold):
    """N slow readers for `hold` seconds: the bytes they got."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        s.setblocking(False)
        socks.append(s)
    got = 0
    end = time.time() + hold
    while time.time() < end:
        for s in socks:
            try:
                got += len(s.recv(1024))
            except OSError:
                pass
        time.sleep(1.0)
    return socks, got


def run(binary, worker_port, n, hold, tmp):
    port, admin = free_port(), free_port()
    cfg = os.path.join(tmp, f"tether-{port}.toml")
    with open(cfg, "w") as f:
        f.write(
            f'[listen]\nhttp = "127.0.0.1:{port}"\nadmin = "127.0.0.1:{admin}"\n\n'
            f'[affinity]\nkeys = ["{base64.b64encode(bytes([1] * 32)).decode()}"]\n\n'
            f'[state]\nstore = "sqlite://{tmp}/t-{port}.db"\n\n'
            f'[limits]\nmax_connections = {n + 100}\n\n'
            f'[[backends]]\nid = "a"\nurl = "http://127.0.0.1:{worker_port}"\n'
        )
    proc = subprocess.Popen(
        [binary, "run", "--config", cfg],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        time.sleep(1.0)
        rows = [("start", rss_mib(proc.pid))]
        for round_ in (1, 2):
            socks, got = attack(port, n, hold)
            rows.append((f"round {round_}: {n} slow readers after {hold}s", rss_mib(proc.pid)))
            for s in socks:
                s.close()
            time.sleep(5.0)
            rows.append((f"round {round_}: 5 s after they left", rss_mib(proc.pid)))
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--hold", type=float, default=15.0)
    a = ap.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Big)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker_port = server.server_address[1]
    with tempfile.TemporaryDirectory() as tmp:
        for b in a.binaries:
            rows = run(b, worker_port, a.clients, a.hold, tmp)
            base = rows[0][1]
            print(f"\n{b}")
            for what, mib in rows:
                print(f"  {what:<45} RSS {mib:7.1f} MiB  ({mib - base:+.1f})")
    server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
