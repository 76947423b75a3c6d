#!/usr/bin/env python3
"""Soak test: mixed traffic (generate, stream, session uploads across
replicas, file-referencing requests) through three replicas on one Redis,
while Redis is restarted (losing its data), one replica is stopped and
started again, and one key's upstream answers stall mid-body (plain, then
SSE) under a short GB_UPSTREAM_IDLE_TIMEOUT. Reports requests by outcome,
the longest HTTP exchange, each replica's resident memory and open file
descriptors sampled from /proc over the run, and checks afterwards that
every file uploaded during the run is still routed to its owner key.

Usage: bench/soak [--seconds N] [--workers N] [--out FILE]
Exit status 1 when a request failed outside the Redis outage and stall
windows, an exchange outlived the upstream timeouts, descriptors leaked, or
a file is misrouted."""

import argparse
import collections
import http.client
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from conftest import BIN_DIR, KEYS, TOKEN, Proc, Stack  # noqa: E402

GENERATE = "/v1beta/models/gemini-2.0-flash:generateContent"
STREAM = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
GRACE = 5.0  # seconds after a fault ends during which failures still count as the fault's
UPSTREAM_TIMEOUT = 5  # GB_UPSTREAM_TIMEOUT: the fake answers at once
IDLE_TIMEOUT = 1  # GB_UPSTREAM_IDLE_TIMEOUT: a stalled body is cut after this
# No HTTP exchange may last longer than the upstream may take to start and to
# stall once, plus a margin for a Redis call or two and a slow CI machine.
EXCHANGE_BOUND = UPSTREAM_TIMEOUT + IDLE_TIMEOUT + 4
STALLED_KEY = KEYS[3]
# Descriptors a replica may hold after the run beyond its idle count: pooled
# keep-alive connections to the upstream and Redis, per worker thread.
FD_SLACK = 64
# Every soak client shares one token, and after Redis loses its data they
# rediscover thousands of files at once: a per-token lookup rate sized for one
# real client would refuse them (that limit has its own tests).
DISCOVERY_BUDGET = 100_000
GATEWAY_ENV = {"GB_UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT), "GB_UPSTREAM_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
               "GB_DISCOVERY_BUDGET": str(DISCOVERY_BUDGET)}


class Soak:
    def __init__(self, seconds, workers):
        self.seconds = seconds
        self.workers = workers
        self.stack = Stack(replicas=3, extra_env=GATEWAY_ENV)
        self.urls = list(self.stack.urls)
        self.lock = threading.Lock()
        self.outage = [None, None]
        self.stall = [None, None]
        self.longest = 0.0
        self.over_bound = []
        self.samples = collections.defaultdict(list)  # pid -> [(t, rss_kib, fds)]
        self.baseline = {}
        self.outcomes = collections.Counter()
        self.failures = []
        self.files = []
        self.rr = 0
        self.sigterm_exit = None

    # -- HTTP with client-side failover (what a load balancer does) --
    def pick(self, offset=0):
        with self.lock:
            self.rr += 1
            return self.urls[(self.rr + offset) % len(self.urls)]

    def call(self, method, path, body=None, headers=None, base=None, read=True, avoid=None):
        headers = dict(headers or {})
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        tries = [base] if base else [self.pick(i) for i in range(3)]
        if avoid:
            # Prefer the other replicas; the avoided one stays the last resort.
            tries = [u for u in tries if u != avoid] + [u for u in tries if u == avoid]
        last = None
        for url in tries:
            u = urllib.parse.urlparse(url)
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
            started = time.monotonic()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read() if read else b""
                headers = dict((k.lower(), v) for k, v in resp.getheaders())
                headers[":served-by"] = url
                return resp.status, headers, payload
            # A refused connection, or one reset or closed before any answer
            # (the stopping replica's listener closed while the connection
            # still waited in its backlog: the request was never read).
            except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
                    http.client.RemoteDisconnected) as e:
                last = e
                continue
            finally:
                conn.close()
                self.timed(method, path, time.monotonic() - started)
        raise ConnectionError(f"no replica answered: {last}")

    def timed(self, method, path, took):
        with self.lock:
            self.longest = max(self.longest, took)
            if took > EXCHANGE_BOUND and len(self.over_bound) < 20:
                self.over_bound.append(f"{method} {path.split('?')[0]}: {took:.1f} s")

    @staticmethod
    def overlaps(window, started, ended):
        s, e = window
        if s is None:
            return False
        e = (e or time.monotonic()) + GRACE
        return started <= e and ended >= s

    def in_outage(self, started, ended):
        return self.overlaps(self.outage, started, ended)

    def record(self, op, started, ok, detail="", status=None):
        ended = time.monotonic()
        with self.lock:
            if ok:
                self.outcomes[f"{op}:ok"] += 1
            elif status == 503 and op in BINDING_OPS and self.in_outage(started, ended):
                # Only requests that need a session or file binding may fail
                # while Redis is down, and only with the store's 503; the rest
                # flow on process-local rotation.
                self.outcomes[f"{op}:expected_during_redis_outage"] += 1
            elif status in (None, 200, 502, 504) and self.overlaps(self.stall, started, ended):
                # One key's answers stall mid-body: the client gets a cut
                # answer (a closed connection, or an SSE error event) once
                # the idle timeout fires; that no exchange outlives it is
                # checked on every exchange.
                self.outcomes[f"{op}:cut_during_upstream_stall"] += 1
            else:
                self.outcomes[f"{op}:FAILED"] += 1
                if len(self.failures) < 20:
                    self.failures.append(f"{op}: {detail}")

    # -- operations --
    def generate(self, body, headers=None):
        h = {"x-goog-api-key": TOKEN, "content-type": "application/json"}
        h.update(headers or {})
        return self.call("POST", GENERATE, body, h)

    def op_generate(self):
        t = time.monotonic()
        status, _, body = self.generate({"contents": [{"parts": [{"text": "hi"}]}]})
        self.record("generate", t, status == 200, f"{status} {body[:200]!r}", status)

    def op_stream(self):
        t = time.monotonic()
        status, _, body = self.call("POST", STREAM, {"contents": [{"parts": [{"text": "hi"}]}]},
                                    {"x-goog-api-key": TOKEN, "content-type": "application/json"})
        self.record("stream", t, status == 200 and b"chunk 2" in body, f"{status} {body[:200]!r}", status)

    def upload(self, sid, data):
        status, headers, body = self.call(
            "POST", "/upload/v1beta/files", {"file": {"display_name": "soak", "mime_type": "text/plain"}},
            {"x-goog-api-key": TOKEN, "x-goog-upload-protocol": "resumable", "x-goog-upload-command": "start",
             "x-session-id": sid, "content-type": "application/json"})
        if status != 200:
            return None, f"start {status} {body[:200]!r}", status
        url = urllib.parse.urlparse(headers["x-goog-upload-url"])
        # Chunks go to another replica than the start.
        status, _, body = self.call("POST", f"{url.path}?{url.query}", data,
                                    {"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"},
                                    avoid=headers[":served-by"])
        if status != 200:
            return None, f"finalize {status} {body[:200]!r}", status
        return json.loads(body)["file"]["name"], "", status

    def op_upload_pair(self):
        t = time.monotonic()
        sid = str(uuid.uuid4())
        names = []
        for data in (b"first", b"second"):
            name, err, status = self.upload(sid, data)
            if name is None:
                self.record("upload_pair", t, False, err, status)
                return
            names.append(name)
            with self.lock:
                self.files.append(name)
        status, _, body = self.generate(file_body(names))
        self.record("upload_pair", t, status == 200 and b"2 files" in body, f"{status} {body[:200]!r}", status)

    def op_use_file(self):
        with self.lock:
            name = random.choice(self.files) if self.files else None
        if name is None:
            return self.op_generate()
        t = time.monotonic()
        status, _, body = self.generate(file_body([name]))
        self.record("use_file", t, status == 200, f"{status} {body[:200]!r}", status)

    def worker(self, deadline):
        ops = [(0.40, self.op_generate), (0.60, self.op_stream), (0.80, self.op_upload_pair), (1.0, self.op_use_file)]
        while time.monotonic() < deadline:
            r = random.random()
            op = next(f for p, f in ops if r < p)
            try:
                op()
            except Exception as e:  # a crash of the client is a lost request too
                self.record(op.__name__.removeprefix("op_"), time.monotonic(), False, repr(e))

    # -- faults --
    def faults(self, t0):
        d = self.seconds
        time.sleep(d * 0.25)
        self.outage[0] = time.monotonic()
        self.stack.redis.proc.kill()
        self.stack.redis.proc.wait(timeout=10)
        time.sleep(d * 0.15)
        self.stack.redis.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.stack.redis.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_redis(self.stack.redis.port)
        self.outage[1] = time.monotonic()
        time.sleep(d * 0.15)
        # SIGTERM a replica while it still takes traffic (a load balancer
        # learns of it from its readiness); clients fail over on refused
        # connections. It must drain and exit 0.
        victim = self.stack.gateways[1]
        victim.proc.send_signal(signal.SIGTERM)
        self.sigterm_exit = victim.proc.wait(timeout=60)
        with self.lock:
            self.urls.remove(victim.url)
        time.sleep(d * 0.1)
        env = {"PATH": os.environ.get("PATH", ""), "GB_LISTEN": "127.0.0.1:0", "GB_API_KEYS": ",".join(KEYS),
               "GB_AUTH_TOKENS": TOKEN, "GB_UPSTREAM_URL": self.stack.fake.url,
               "GB_REDIS_URL": self.stack.redis.url, "RUST_LOG": "info", **GATEWAY_ENV}
        fresh = Proc([str(BIN_DIR / "gemini-balancer")], env, "stderr")
        self.stack.gateways[1] = fresh
        with self.lock:
            self.urls.insert(1, fresh.url)

    def stalls(self):
        """Stalled upstream answers on one key, plain then SSE, with the
        rest of the traffic flowing. Runs after the other faults."""
        d = self.seconds
        time.sleep(d * 0.68)
        self.stall[0] = time.monotonic()
        self.stack.fake.set_mode(STALLED_KEY, {"mode": "stall", "status": 200, "after": 10})
        time.sleep(d * 0.08)
        self.stack.fake.set_mode(STALLED_KEY, {"mode": "stall", "status": 200, "after": 40, "sse": True})
        time.sleep(d * 0.08)
        self.stack.fake.set_mode(STALLED_KEY, {"mode": "stall", "status": 429, "after": 20})
        time.sleep(d * 0.04)
        self.stack.fake.set_mode(STALLED_KEY, {"mode": "normal"})
        self.stall[1] = time.monotonic()

    def sample(self, stop):
        """Each live replica's resident memory and open descriptors, twice a
        second, from /proc."""
        while not stop.is_set():
            for g in list(self.stack.gateways):
                pid = g.proc.pid
                figures = proc_figures(pid)
                if figures:
                    self.samples[pid].append((time.monotonic(),) + figures)
            stop.wait(0.5)

    def resources(self):
        """Per replica: memory and descriptors at the start, at their peak,
        and after the run once in-flight exchanges have ended."""
        out = []
        for g in self.stack.gateways:
            pid = g.proc.pid
            samples = self.samples.get(pid, [])
            end = proc_figures(pid)
            if not samples or not end:
                continue
            start = self.baseline.get(pid, samples[0][1:])
            out.append({
                "pid": pid,
                "samples": len(samples),
                "rss_kib": {"start": start[0], "peak": max(s[1] for s in samples), "end": end[0]},
                "fds": {"start": start[1], "peak": max(s[2] for s in samples), "end": end[1]},
            })
        return out

    def verify_files(self):
        owners = self.stack.fake.file_owners()
        misrouted = []
        for name in self.files:
            for base in self.urls:
                status, _, body = self.call("POST", GENERATE, file_body([name]),
                                            {"x-goog-api-key": TOKEN, "content-type": "application/json"}, base=base)
                if status != 200:
                    misrouted.append(f"{name} via {base}: {status} {body[:120]!r}")
        return owners, misrouted

    def run(self):
        t0 = time.monotonic()
        deadline = t0 + self.seconds
        for g in self.stack.gateways:
            self.baseline[g.proc.pid] = proc_figures(g.proc.pid)
        stop = threading.Event()
        sampler = threading.Thread(target=self.sample, args=(stop,))
        sampler.start()
        threads = [threading.Thread(target=self.worker, args=(deadline,)) for _ in range(self.workers)]
        chaos = threading.Thread(target=self.faults, args=(t0,))
        stalls = threading.Thread(target=self.stalls)
        for th in threads + [chaos, stalls]:
            th.start()
        for th in threads + [chaos, stalls]:
            th.join()
        owners, misrouted = self.verify_files()
        # Upstream connections of cut answers are closed by then: every
        # exchange has ended, and none may outlive EXCHANGE_BOUND.
        stop.set()
        sampler.join()
        resources = self.resources()
        failed = sum(n for k, n in self.outcomes.items() if k.endswith(":FAILED"))
        report = {
            "seconds": self.seconds,
            "workers": self.workers,
            "requests_by_outcome": dict(sorted(self.outcomes.items())),
            "failed_outside_outage": failed,
            "first_failures": self.failures,
            "files_uploaded": len(self.files),
            "files_misrouted": len(misrouted),
            "misrouted": misrouted[:20],
            # What the replicas logged about the first misrouted files (file
            # names are not secrets), to tell which fault moved them.
            "misrouted_log": [line.strip()[:400] for line in self.stack.logs().splitlines()
                              if any(m.split(" via ")[0] in line for m in misrouted[:3])][:30],
            "secrets_in_logs": any(s in self.stack.logs() for s in KEYS + [TOKEN]),
            "sigterm_exit_code": self.sigterm_exit,
            "upstream_timeout_s": UPSTREAM_TIMEOUT,
            "upstream_idle_timeout_s": IDLE_TIMEOUT,
            "exchange_bound_s": EXCHANGE_BOUND,
            "longest_exchange_s": round(self.longest, 2),
            "exchanges_over_bound": self.over_bound,
            "replicas": resources,
            "fds_leaked": [r["pid"] for r in resources if r["fds"]["end"] > r["fds"]["start"] + FD_SLACK],
        }
        self.stack.stop()
        return report


BINDING_OPS = ("upload_pair", "use_file")


def wait_for_redis(port, deadline_s=20):
    """Until the restarted redis-server answers PING (bounded)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if b"PONG" in s.recv(64):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not come back")


def proc_figures(pid):
    """(resident KiB, open descriptors) of a live process, else None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None


def file_body(names):
    parts = [{"fileData": {"fileUri": n, "mimeType": "text/plain"}} for n in names]
    return {"contents": [{"parts": parts + [{"text": "use these"}]}]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "soak-results.json"))
    args = ap.parse_args()
    report = Soak(args.seconds, args.workers).run()
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = (report["failed_outside_outage"] == 0 and report["files_misrouted"] == 0
          and not report["secrets_in_logs"] and report["sigterm_exit_code"] == 0
          and not report["exchanges_over_bound"] and not report["fds_leaked"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
