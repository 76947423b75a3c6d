#!/usr/bin/env python3
"""Many concurrent SSE streams through one replica, nginx `proxy_pass` and
direct, under the same load.

The fake upstream streams `--events` events, one per `--interval-ms`; the
client (dev/sse-load) opens `--streams` streams spread evenly over `--ramp` seconds and keeps
them all open. Reported per target: errors, streams that got every event,
time to the first event (p50 / p99, from the start of the TCP connect), the
serving processes' peak RSS and RSS per stream, CPU seconds, and open file
descriptors at the peak.

The gateway reaches the fake over TLS with HTTP/2 (as it reaches Google), so
its streams share a few upstream connections: one replica holds one socket
per client. nginx speaks HTTP/1.1 to its upstreams, so it holds two sockets
per stream; it runs two workers so that neither exceeds the per-process
open-file limit. Direct and nginx reach the fake's plain-HTTP port.

Usage: bench/streams.py [--streams N] [--ramp S] [--events E] [--interval-ms MS]
Prints one JSON document on stdout (bench/run embeds it in RESULTS.md).
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import BIN, KEYS, TOKEN, free_port, proc_stat, start, start_nginx  # noqa: E402

STREAM = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
# The load client (dev/sse-load), built with the release binaries.
LOAD = BIN / "sse-load"


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def measure(name, url, credential, pids, args, upstream_pids=()):
    """Runs the load against `url` while sampling the serving processes."""
    cpu0 = sum(proc_stat(p)[1] for p in pids)
    ucpu0 = sum(proc_stat(p)[1] for p in upstream_pids)
    rss0 = sum(proc_stat(p)[0]["VmRSS"] for p in pids)
    peak = {"rss_kib": 0, "fds": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["rss_kib"] = max(peak["rss_kib"], sum(proc_stat(p)[0]["VmRSS"] for p in pids))
            peak["fds"] = max(peak["fds"], sum(fds(p) for p in pids))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    addr = url.split("//", 1)[1]
    out = subprocess.run([str(LOAD), addr, STREAM, credential, str(args.streams), str(args.ramp),
                          str(args.events), str(int(args.timeout))], capture_output=True, text=True, check=True)
    stop.set()
    sampler.join()
    cpu = sum(proc_stat(p)[1] for p in pids) - cpu0
    ucpu = sum(proc_stat(p)[1] for p in upstream_pids) - ucpu0
    row = {"target": name, **json.loads(out.stdout),
           "idle_rss_mib": round(rss0 / 1024, 1), "peak_rss_mib": round(peak["rss_kib"] / 1024, 1),
           "rss_per_stream_kib": round((peak["rss_kib"] - rss0) / args.streams, 2),
           "cpu_s": round(cpu, 2), "upstream_cpu_s": round(ucpu, 2) if upstream_pids else None,
           "peak_fds": peak["fds"]}
    print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def self_signed(workdir):
    cert, key = f"{workdir}/cert.pem", f"{workdir}/key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "basicConstraints=critical,CA:FALSE", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--ramp", type=float, default=4.0, help="seconds over which the streams are opened")
    ap.add_argument("--events", type=int, default=10)
    ap.add_argument("--interval-ms", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--targets", default="direct,nginx,gateway", help="which of direct, nginx, gateway to run")
    ap.add_argument("--redis", action=argparse.BooleanOptionalAction, default=True,
                    help="the gateway on a Redis store (default) or the embedded one")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = tempfile.mkdtemp(prefix="gb-bench-streams-")
    procs = []
    try:
        cert, key = self_signed(workdir)
        fake, fake_url = start([str(BIN / "fake-gemini")], dict(
            os.environ, FAKE_KEYS=",".join(KEYS), FAKE_RECORD="0", FAKE_TLS_CERT=cert, FAKE_TLS_KEY=key,
            FAKE_SSE_EVENTS=str(args.events), FAKE_SSE_INTERVAL_MS=str(args.interval_ms)), "stdout",
            marker="listening on ", before="control on ")
        procs.append(fake)
        plain = fake.control_url
        env = {"PATH": os.environ.get("PATH", ""), "GB_LISTEN": "127.0.0.1:0", "GB_API_KEYS": ",".join(KEYS),
               "GB_AUTH_TOKENS": TOKEN, "GB_UPSTREAM_URL": fake_url, "GB_UPSTREAM_CA_FILE": cert,
               "RUST_LOG": "warn,gemini_balancer::startup=info"}
        if args.redis:
            redis_port = free_port()
            redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
            procs.append(redis)
            time.sleep(0.5)
            env["GB_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}"
        gw, gw_url = start([str(BIN / "gemini-balancer")], env, "stderr")
        procs.append(gw)
        nginx, nginx_url, nginx_pids = start_nginx(workdir, plain.split("//", 1)[1], workers=2)
        procs.append(nginx)
        targets = args.targets.split(",")
        if os.environ.get("STREAMS_PID_FILE"):
            # For a profiler attached from outside.
            pathlib.Path(os.environ["STREAMS_PID_FILE"]).write_text(str(gw.pid))
        rows = []
        if "direct" in targets:
            rows.append(measure("direct to the fake", plain, KEYS[0], [fake.pid], args))
        if "nginx" in targets:
            rows.append(measure("nginx proxy_pass (2 workers)", nginx_url, KEYS[0], nginx_pids, args,
                                [fake.pid]))
        if "gateway" in targets:
            rows.append(measure("gateway" + (", Redis" if args.redis else ", embedded store"), gw_url, TOKEN,
                                [gw.pid], args, [fake.pid]))
        direct = rows[0]["first_event_p99_ms"] if rows and rows[0]["target"].startswith("direct") else 0
        for r in rows:
            if r["first_event_p99_ms"] is not None:
                r["first_event_p99_above_direct_ms"] = round(r["first_event_p99_ms"] - direct, 2)
        print(json.dumps({"settings": vars(args), "nofile_limit": hard, "rows": rows}, indent=2))
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
