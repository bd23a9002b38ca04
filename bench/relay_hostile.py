#!/usr/bin/env python3
"""The relay under slow and oversized clients, measured from outside (stdlib only).

Starts target/release/tether-relay on a free port with its defaults, then:
  1. slowloris: N connections sending their headers a byte every 2 s; how many are still open
     after --hold seconds (the relay's limits.header_timeout_ms is 10 s);
  2. normal requests while those slow clients are connected: p50/p99 of digits inferences, one
     at a time, against the same with no slow clients (same run);
  3. memory: the relay's peak RSS (VmHWM) before and after one request of --body-mib MiB of
     nested rows ([[[0.5]]], ...), the shape that costs most as a JSON tree.

    cargo build --release -p cloud-relay
    python3 bench/relay_hostile.py [--slow 200] [--hold 40] [--requests 300] [--body-mib 60]
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def infer(port, body, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    c.request("POST", "/v2/models/digits/infer", body=body, headers={"content-type": "application/json"})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status, (time.perf_counter() - start) * 1e3


def latencies(port, n):
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": [float(i % 16) for i in range(64)]}]})
    out = []
    for _ in range(n):
        status, ms = infer(port, body)
        if status != 200:
            raise SystemExit(f"a normal request got {status}")
        out.append(ms)
    out.sort()
    return statistics.median(out), out[min(len(out) - 1, int(len(out) * 0.99))]


def slowloris(port, n, stop, opened):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: r")
        socks.append(s)
    opened.extend(socks)
    while not stop.is_set():
        for s in socks:
            try:
                s.sendall(b"x")
            except OSError:
                pass
        stop.wait(2.0)


def still_open(socks):
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(1, socket.MSG_PEEK)
            alive += 0 if data == b"" else 1  # b"" is an orderly close
        except BlockingIOError:
            alive += 1  # nothing to read and not closed
        except OSError:
            pass
    return alive


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--relay", default=str(ROOT / "target" / "release" / "tether-relay"))
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--hold", type=float, default=40.0)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--body-mib", type=float, default=60.0)
    a = ap.parse_args()
    port = free_port()
    conf = Path(tempfile.mkdtemp(prefix="relay-hostile-")) / "relay.toml"
    conf.write_text(f'listen = "127.0.0.1:{port}"\nmodels_dir = "{ROOT / "models" / "zoo"}"\n')
    relay = subprocess.Popen([a.relay, "--config", str(conf)], stderr=subprocess.DEVNULL,
                             env=dict(os.environ, RUST_LOG="error"))
    try:
        for _ in range(200):
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/v2/health/ready")
                break
            except OSError:
                time.sleep(0.1)
        latencies(port, 50)  # warm up
        quiet = latencies(port, a.requests)

        stop, opened = threading.Event(), []
        t = threading.Thread(target=slowloris, args=(port, a.slow, stop, opened), daemon=True)
        t.start()
        time.sleep(1.0)
        loaded = latencies(port, a.requests)
        time.sleep(max(0.0, a.hold - 1.0))
        alive = still_open(opened)
        stop.set()

        before = vm_hwm_kib(relay.pid)
        rows = int(a.body_mib * (1 << 20) / len("[[[0.5]]],"))
        body = ('{"inputs":[{"name":"input","shape":[%d,1,1],"datatype":"FP32","data":[' % rows
                + ",".join(["[[0.5]]"] * rows) + "]}]}")
        status, ms = infer(port, body.encode(), timeout=120)
        after = vm_hwm_kib(relay.pid)
        print(f"relay: {a.relay}")
        print(f"slow clients: {a.slow} opened, {alive} still open after {a.hold:.0f} s")
        print(f"normal requests, one at a time, {a.requests} each: "
              f"alone p50 {quiet[0]:.2f} ms p99 {quiet[1]:.2f} ms; "
              f"with {a.slow} slow clients p50 {loaded[0]:.2f} ms p99 {loaded[1]:.2f} ms")
        print(f"one {len(body) / (1 << 20):.1f} MiB body of nested rows ({rows} values): HTTP {status} in {ms:.0f} ms; "
              f"peak RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after")
    finally:
        relay.terminate()
        relay.wait()


if __name__ == "__main__":
    sys.exit(main())
