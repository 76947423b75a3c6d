#!/usr/bin/env python3
"""Gateway vs direct-to-upstream and vs nginx `proxy_pass`, same machine,
same run.

Starts the fake upstream (release build), then measures: direct to the fake;
nginx `proxy_pass` in front of it (one worker, pooled keep-alive upstream
connections: the cost of a bare proxy hop); the gateway on the embedded
store; the gateway on Redis (unpinned and session-pinned); on a Redis Cluster;
three replicas behind nginx (scripts/local-stack). Saturation with `wrk -t1`
(else `oha`), latency at one connection with `oha`; SSE time to first event;
many concurrent SSE streams (bench/streams.py); a large upload's peak RSS.
With BENCH_BASELINE_BIN set (earlier builds' binaries, comma-separated,
named by BENCH_BASELINE_LABEL in the same order), each such build on a Redis
of its own is one more row: before and after a change, in one run.
Writes bench/RESULTS.md and bench/results.json.
Usage: bench/run [--seconds N] [--conns C] [--rounds N] [--delays-ms D,D] [--streams N]
"""

import argparse
import http.client
import json
import os
import pathlib
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import BIN, KEYS, ROOT, TOKEN, free_port, have_nginx, proc_stat, start, start_nginx  # noqa: E402

GENERATE = "/v1beta/models/gemini-2.0-flash:generateContent"
BODY = json.dumps({"contents": [{"parts": [{"text": "hello"}]}]})


def redis_calls(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"], capture_output=True, text=True).stdout
    total = 0
    for line in out.splitlines():
        if line.startswith("cmdstat_") and not line.startswith(("cmdstat_info", "cmdstat_ping")):
            total += int(line.split("calls=")[1].split(",")[0])
    return total


def oha(url, seconds, conns, rate=None, headers=(), credential=TOKEN):
    cmd = [OHA, "-z", f"{seconds}s", "-c", str(conns), "--no-tui", "--output-format", "json",
           "-m", "POST", "-T", "application/json", "-d", BODY, "-H", f"x-goog-api-key: {credential}"]
    for h in headers:
        cmd += ["-H", h]
    if rate:
        cmd += ["-q", str(rate)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    lat = r["latencyPercentiles"]
    codes = r.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    return {
        "rps": round(r["summary"]["requestsPerSec"], 1),
        "p50_ms": round(lat["p50"] * 1000, 3),
        "p99_ms": round(lat["p99"] * 1000, 3),
        "p99_9_ms": round(lat["p99.9"] * 1000, 3),
        "requests": sum(codes.values()),
        "ok_ratio": round(ok / max(1, sum(codes.values())), 4),
    }


def wrk(url, seconds, conns, headers=(), credential=TOKEN):
    """A saturation run with one wrk thread (light on the shared cores)."""
    cmd = [WRK, "-t1", "-c", str(conns), "-d", f"{seconds}s", "-s", str(ROOT / "bench" / "wrk.lua"),
           "-H", f"x-goog-api-key: {credential}"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True,
                         env=dict(os.environ, WRK_BODY=BODY)).stdout
    r = json.loads(out.strip().splitlines()[-1])
    total = r["requests"]
    return {
        "rps": round(total / (r["duration_us"] / 1e6), 1),
        "p50_ms": round(r["p50_us"] / 1000, 3),
        "p99_ms": round(r["p99_us"] / 1000, 3),
        "p99_9_ms": round(r["p999_us"] / 1000, 3),
        "requests": total,
        "ok_ratio": round(1 - (r["status_errors"] + r["socket_errors"]) / max(1, total), 4),
    }


def store_calls(urls):
    """Round trips to the state store, from each replica's own metrics."""
    total = 0.0
    for u in urls:
        with urllib.request.urlopen(f"{u}/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("gb_store_command_latency_seconds_count"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


class Config:
    """One configuration under test: where to send load and what to count."""

    def __init__(self, name, url, pids, redis=None, headers=(), credential=TOKEN, metrics_urls=(),
                 upstream_pids=()):
        self.name, self.url, self.pids = name, url, pids
        # The fake's pid when it is not the process under test itself.
        self.upstream_pids = list(upstream_pids)
        # (port, pid) of each Redis server this configuration uses (one, or a
        # cluster's nodes).
        self.redis = [redis] if isinstance(redis, tuple) else list(redis or [])
        self.headers, self.credential, self.metrics_urls = headers, credential, metrics_urls
        self.rounds = []
        self.cpu = self.redis_cpu = self.upstream_cpu = 0.0
        self.redis_cmds = self.trips = 0
        self.one_conn_rounds = []


def saturate(c, args):
    """One saturation round of `c`, adding its costs to the totals."""
    before = [proc_stat(p)[1] for p in c.pids]
    ucpu0 = sum(proc_stat(p)[1] for p in c.upstream_pids)
    rcpu0 = sum(proc_stat(pid)[1] for _, pid in c.redis)
    calls0 = sum(redis_calls(port) for port, _ in c.redis)
    trips0 = store_calls(c.metrics_urls) if c.metrics_urls else 0
    load = wrk if WRK else oha
    sat = load(c.url + GENERATE, args.seconds, args.conns, headers=c.headers, credential=c.credential)
    c.cpu += sum(proc_stat(p)[1] for p in c.pids) - sum(before)
    c.upstream_cpu += sum(proc_stat(p)[1] for p in c.upstream_pids) - ucpu0
    if c.redis:
        c.redis_cpu += sum(proc_stat(pid)[1] for _, pid in c.redis) - rcpu0
        c.redis_cmds += sum(redis_calls(port) for port, _ in c.redis) - calls0
    if c.metrics_urls:
        c.trips += store_calls(c.metrics_urls) - trips0
    c.rounds.append(sat)
    print(f"  {c.name}: {sat['rps']} req/s", flush=True)


def summary(c, args):
    """The median round of `c`, with costs over every round."""
    rounds = sorted(c.rounds, key=lambda r: r["rps"])
    one = {k: round(statistics.median(r[k] for r in c.one_conn_rounds), 3)
           for k in ("rps", "p50_ms", "p99_ms", "p99_9_ms")}
    one["requests"] = sum(r["requests"] for r in c.one_conn_rounds)
    row = {"config": c.name, "saturation": rounds[len(rounds) // 2],
           "saturation_rps_rounds": [r["rps"] for r in c.rounds], "one_connection": one,
           "one_connection_p50_rounds": [r["p50_ms"] for r in c.one_conn_rounds]}
    total = sum(r["requests"] for r in c.rounds)
    if c.pids:
        row["cpu_us_per_request"] = round(c.cpu / max(1, total) * 1e6, 1)
        row["peak_rss_mib"] = round(max(proc_stat(p)[0]["VmHWM"] for p in c.pids) / 1024, 1)
    if c.upstream_pids:
        row["upstream_cpu_us_per_request"] = round(c.upstream_cpu / max(1, total) * 1e6, 1)
    if c.redis:
        # Commands run inside a Lua script count here too.
        row["redis_commands_per_request"] = round(c.redis_cmds / max(1, total), 3)
        row["redis_cpu_us_per_request"] = round(c.redis_cpu / max(1, total) * 1e6, 1)
    if c.metrics_urls:
        row["store_round_trips_per_request"] = round(c.trips / max(1, total), 3)
    print(f"{c.name}: {json.dumps(row)}", flush=True)
    return row


def ttfb(url, n=200, credential=TOKEN):
    """Time to the first SSE event, sequential requests, in ms."""
    u = urllib.parse.urlparse(url)
    times = []
    for _ in range(n):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        t = time.perf_counter()
        conn.request("POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", body=BODY,
                     headers={"x-goog-api-key": credential, "content-type": "application/json"})
        resp = conn.getresponse()
        resp.read1(1)
        times.append((time.perf_counter() - t) * 1000)
        resp.read()
        conn.close()
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p99_ms": round(times[int(len(times) * 0.99) - 1], 3)}


# A client token with an entry in the limits file (see run_pass).
LIMITED_TOKEN = "bench-limited-0123456789"


def gateway_env(fake_url, redis_port=None):
    env = {"PATH": os.environ.get("PATH", ""), "GB_LISTEN": "127.0.0.1:0", "GB_API_KEYS": ",".join(KEYS),
           "GB_AUTH_TOKENS": TOKEN, "GB_UPSTREAM_URL": fake_url, "RUST_LOG": "warn,gemini_balancer::startup=info"}
    if redis_port:
        env["GB_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}"
    return env


def cluster_port():
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        p = free_port()
        if p + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue


def start_cluster(workdir):
    """A Redis Cluster of 3 masters and 3 replicas; [(port, pid)] of every node."""
    nodes = []
    for _ in range(6):
        port = cluster_port()
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--cluster-enabled", "yes", "--cluster-config-file", f"{workdir}/nodes-{port}.conf",
             "--dir", workdir], stdout=subprocess.DEVNULL)
        nodes.append((port, proc))
    for port, _ in nodes:
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True, text=True).stdout.strip() != "PONG":
            if time.monotonic() > deadline:
                raise SystemExit("a cluster node did not start")
            time.sleep(0.1)
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p, _ in nodes],
                    "--cluster-replicas", "1", "--cluster-yes"], check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not all("cluster_state:ok" in subprocess.run(["redis-cli", "-p", str(p), "CLUSTER", "INFO"],
                                                      capture_output=True, text=True).stdout for p, _ in nodes):
        if time.monotonic() > deadline:
            raise SystemExit("the cluster did not come up")
        time.sleep(0.2)
    return nodes


def run_pass(args, delay_ms):
    """Every configuration against a fake that answers after `delay_ms`.

    Everything is started first; then the saturation runs go round the
    configurations `--rounds` times (the machine's speed drifts over minutes,
    so each configuration samples the same stretch of time as the direct
    run) and each row reports its median round.
    """
    procs = []
    extra = {}
    stack_dir = None
    env = None
    try:
        fake, fake_url = start([str(BIN / "fake-gemini")],
                               dict(os.environ, FAKE_KEYS=",".join(KEYS), FAKE_RECORD="0",
                                    FAKE_DELAY_MS=str(delay_ms)), "stdout")
        procs.append(fake)
        gw, gw_url = start([str(BIN / "gemini-balancer")], gateway_env(fake_url), "stderr")
        procs.append(gw)
        time.sleep(0.5)
        extra["idle_rss_mib"] = round(proc_stat(gw.pid)[0]["VmRSS"] / 1024, 1)
        redis_port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL)
        procs.append(redis)
        time.sleep(0.5)
        # This replica also serves a client with limits (rpm and tpm, far
        # above what the run reaches): its row shows what admission costs;
        # the other rows' token has no entry, so no limit is looked up.
        limits_dir = tempfile.mkdtemp(prefix="gb-bench-limits-")
        limits_file = pathlib.Path(limits_dir, "limits.toml")
        limits_file.write_text("[clients.limited]\nrpm = 1000000000\ntpm = 1000000000000\n")
        renv = gateway_env(fake_url, redis_port)
        renv["GB_AUTH_TOKENS"] = f"{TOKEN},limited={LIMITED_TOKEN}"
        renv["GB_LIMITS_FILE"] = str(limits_file)
        gwr, gwr_url = start([str(BIN / "gemini-balancer")], renv, "stderr")
        procs.append(gwr)
        # The same replica setup exporting every trace (GB_OTLP_SAMPLE=1) to
        # a collector: the fake's /_fake/v1/traces, which takes and counts
        # OTLP posts. The plain Redis row has GB_OTLP_ENDPOINT unset.
        tenv = gateway_env(fake_url, redis_port)
        tenv["GB_OTLP_ENDPOINT"] = fake_url + "/_fake"
        gwt, gwt_url = start([str(BIN / "gemini-balancer")], tenv, "stderr")
        procs.append(gwt)
        # An earlier build of the gateway (BENCH_BASELINE_BIN, built from
        # another revision) on a Redis of its own: before and after a change,
        # measured in one run.
        baselines = []
        labels = os.environ.get("BENCH_BASELINE_LABEL", "").split(",")
        for i, binary in enumerate(b for b in os.environ.get("BENCH_BASELINE_BIN", "").split(",") if b):
            base_port = free_port()
            base_redis = subprocess.Popen(["redis-server", "--port", str(base_port), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
            procs.append(base_redis)
            time.sleep(0.5)
            gwb, gwb_url = start([binary], gateway_env(fake_url, base_port), "stderr")
            procs.append(gwb)
            label = labels[i] if i < len(labels) and labels[i] else f"earlier build {i + 1}"
            baselines.append((f"baseline: {label}", gwb, gwb_url, base_port, base_redis))
        if baselines:
            # This build set up exactly as the baselines are (its own Redis,
            # no limits file, no other replica on that Redis), so that the
            # rows compare builds, not setups.
            base_port = free_port()
            base_redis = subprocess.Popen(["redis-server", "--port", str(base_port), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
            procs.append(base_redis)
            time.sleep(0.5)
            gwb, gwb_url = start([str(BIN / "gemini-balancer")], gateway_env(fake_url, base_port), "stderr")
            procs.append(gwb)
            baselines.append(("this build, set up as the baselines", gwb, gwb_url, base_port, base_redis))
        # The floor of the stack: actix-web in, awc out, nothing else.
        fwd, fwd_url = start([str(BIN / "bare-forwarder")],
                             dict(os.environ, FORWARD_UPSTREAM=fake_url, FORWARD_WORKERS="2"), "stdout")
        procs.append(fwd)
        cluster_dir = tempfile.mkdtemp(prefix="gb-bench-cluster-")
        cluster = start_cluster(cluster_dir)
        procs += [p for _, p in cluster]
        cenv = gateway_env(fake_url)
        cenv["GB_REDIS_MODE"] = "cluster"
        cenv["GB_REDIS_URL"] = ",".join(f"redis://127.0.0.1:{p}" for p, _ in cluster[:3])
        gwc, gwc_url = start([str(BIN / "gemini-balancer")], cenv, "stderr")
        procs.append(gwc)
        # The direct and nginx runs authenticate with a real key of the fake.
        up = [fake.pid]
        configs = [Config("direct to the fake", fake_url, [fake.pid], credential=KEYS[0])]
        if have_nginx():
            nginx_dir = tempfile.mkdtemp(prefix="gb-bench-nginx-")
            nginx, nginx_url, nginx_pids = start_nginx(nginx_dir, fake_url.split("//", 1)[1])
            procs.append(nginx)
            configs.append(Config("nginx proxy_pass", nginx_url, nginx_pids, credential=KEYS[0], upstream_pids=up))
        configs += [
            Config("bare actix-web + awc forwarder", fwd_url, [fwd.pid], credential=KEYS[0], upstream_pids=up),
            Config("gateway, embedded store", gw_url, [gw.pid], metrics_urls=[gw_url], upstream_pids=up),
            Config("gateway, Redis", gwr_url, [gwr.pid], (redis_port, redis.pid), metrics_urls=[gwr_url],
                   upstream_pids=up),
        ]
        for label, gwb, gwb_url, base_port, base_redis in baselines:
            configs.append(Config(f"gateway, Redis, {label}", gwb_url, [gwb.pid],
                                  (base_port, base_redis.pid), metrics_urls=[gwb_url], upstream_pids=up))
        configs += [
            Config("gateway, Redis, session-pinned", gwr_url, [gwr.pid], (redis_port, redis.pid),
                   headers=("x-session-id: bench-session",), metrics_urls=[gwr_url], upstream_pids=up),
            Config("gateway, Redis, client with rpm + tpm limits", gwr_url, [gwr.pid], (redis_port, redis.pid),
                   credential=LIMITED_TOKEN, metrics_urls=[gwr_url], upstream_pids=up),
            Config("gateway, Redis, every trace exported", gwt_url, [gwt.pid], (redis_port, redis.pid),
                   metrics_urls=[gwt_url], upstream_pids=up),
            Config("gateway, Redis Cluster (3 masters)", gwc_url, [gwc.pid],
                   [(port, proc.pid) for port, proc in cluster], metrics_urls=[gwc_url], upstream_pids=up),
        ]
        if have_nginx():
            stack_dir = tempfile.mkdtemp(prefix="gb-bench-stack-")
            env = dict(os.environ, GB_BIN_DIR=str(BIN), STACK_KEYS=",".join(KEYS), STACK_TOKEN=TOKEN,
                       FAKE_RECORD="0", FAKE_DELAY_MS=str(delay_ms), RUST_LOG="warn,gemini_balancer::startup=info")
            subprocess.run(["bash", str(ROOT / "scripts" / "local-stack"), "start", stack_dir], env=env,
                           check=True, stdout=subprocess.DEVNULL)
            info = dict(l.split("=", 1) for l in pathlib.Path(stack_dir, "stack.env").read_text().split())
            pids = [int(pathlib.Path(stack_dir, f"gateway-{i}.pid").read_text()) for i in (1, 2, 3)]
            urls = []
            for i in (1, 2, 3):
                log = pathlib.Path(stack_dir, f"gateway-{i}.log").read_text()
                urls.append(log.split("listening on ", 1)[1].split()[0].split('"')[0])
            redis_pid = int(pathlib.Path(stack_dir, "redis.pid").read_text())
            stack_fake = int(pathlib.Path(stack_dir, "fake.pid").read_text()) \
                if pathlib.Path(stack_dir, "fake.pid").exists() else None
            configs.append(Config("3 replicas + nginx, Redis", info["LB_URL"], pids,
                                  (int(info["REDIS_PORT"]), redis_pid), metrics_urls=urls,
                                  upstream_pids=[stack_fake] if stack_fake else []))
        for r in range(args.rounds):
            print(f"{delay_ms} ms upstream, round {r + 1} of {args.rounds}", flush=True)
            for c in configs:
                saturate(c, args)
            for c in configs:
                c.one_conn_rounds.append(oha(c.url + GENERATE, args.latency_seconds, 1,
                                             headers=c.headers, credential=c.credential))
        rows = [summary(c, args) for c in configs]
        with urllib.request.urlopen(fake_url + "/_fake/traces", timeout=10) as resp:
            extra["traces_exported"] = json.loads(resp.read())
        extra["streaming_first_event"] = {"direct": ttfb(fake_url, credential=KEYS[0]), "gateway_redis": ttfb(gwr_url)}
    finally:
        if stack_dir:
            subprocess.run(["bash", str(ROOT / "scripts" / "local-stack"), "stop", stack_dir], env=env)
        for p in procs:
            p.kill()
    direct = rows[0]
    nginx = next((r for r in rows if r["config"] == "nginx proxy_pass"), None)
    floor = next((r for r in rows if r["config"].startswith("bare actix-web")), None)
    for r in rows:
        r["throughput_vs_direct"] = round(r["saturation"]["rps"] / direct["saturation"]["rps"], 3)
        if floor:
            r["throughput_vs_forwarder"] = round(r["saturation"]["rps"] / floor["saturation"]["rps"], 3)
            if r.get("cpu_us_per_request") and floor.get("cpu_us_per_request") and r is not direct:
                # The proxy's CPU and, for the gateway on Redis, Redis's.
                own = r["cpu_us_per_request"] + r.get("redis_cpu_us_per_request", 0)
                r["cpu_vs_forwarder"] = round(own / floor["cpu_us_per_request"], 3)
        if nginx:
            r["throughput_vs_nginx"] = round(r["saturation"]["rps"] / nginx["saturation"]["rps"], 3)
        r["added_p50_ms"] = round(r["one_connection"]["p50_ms"] - direct["one_connection"]["p50_ms"], 3)
        r["added_p99_ms"] = round(r["one_connection"]["p99_ms"] - direct["one_connection"]["p99_ms"], 3)
    return {"upstream_delay_ms": delay_ms, "configs": rows, **extra}


def allocations_per_request(seconds=3):
    """Heap allocations per generate request, counted by a gateway built with
    the `count-allocations` feature (bench/run builds it as
    gemini-balancer-counting): embedded store and Redis, each warmed up, then
    loaded on 16 connections; the counter's rise over the requests served.
    Background work in those seconds is counted too (a few allocations every
    few milliseconds: a small overstatement)."""
    binary = BIN / "gemini-balancer-counting"
    if not binary.exists():
        return None
    procs, out = [], {}
    try:
        fake, fake_url = start([str(BIN / "fake-gemini")],
                               dict(os.environ, FAKE_KEYS=",".join(KEYS), FAKE_RECORD="0"), "stdout")
        procs.append(fake)
        redis_port = free_port()
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save",
                                       "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
        time.sleep(0.5)
        for name, port in (("embedded store", None), ("Redis", redis_port)):
            gw, url = start([str(binary)], gateway_env(fake_url, port), "stderr")
            procs.append(gw)
            load = wrk if WRK else oha
            load(url + GENERATE, 1, 16)

            def counted():
                with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
                    for line in resp.read().decode().splitlines():
                        if line.startswith("gb_process_allocations_total"):
                            return float(line.rsplit(" ", 1)[1])
                raise SystemExit("the counting build publishes no gb_process_allocations_total")

            before = counted()
            served = load(url + GENERATE, seconds, 16)["requests"]
            out[name] = round((counted() - before) / max(1, served), 1)
    finally:
        for p in procs:
            p.kill()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--latency-seconds", type=int, default=5, help="length of each one-connection latency run")
    ap.add_argument("--rounds", type=int, default=3, help="saturation runs per configuration (median reported)")
    ap.add_argument("--delays-ms", default="0",
                    help="the fake's added latency per model call, one pass each")
    ap.add_argument("--upload-mib", type=int, default=1024)
    ap.add_argument("--streams", type=int, default=10_000, help="concurrent SSE streams (0: skip that section)")
    args = ap.parse_args()
    passes = [run_pass(args, int(d)) for d in args.delays_ms.split(",")]
    allocs = allocations_per_request()
    streams = None
    if args.streams:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "streams.py"), "--streams", str(args.streams)],
                             capture_output=True, text=True, check=True)
        streams = json.loads(out.stdout)
    upload = subprocess.run([sys.executable, str(ROOT / "bench" / "upload_rss.py"), str(args.upload_mib)],
                            capture_output=True, text=True, check=True)
    upload = json.loads(upload.stdout)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, "
               f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, Linux {platform.release()}")
    results = {"command": "bench/run " + " ".join(sys.argv[1:]), "machine": machine, "settings": vars(args),
               "passes": passes, "allocations_per_request": allocs, "streams": streams, "upload": upload}
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)
    print((ROOT / "bench" / "RESULTS.md").read_text())


def write_markdown(r):
    st = r["settings"]
    tool = "wrk -t1" if WRK else "oha"
    lines = ["# Benchmark results", "",
             f"Command: `{r['command']}` — machine: {r['machine']}. The load generator, the fake upstream, nginx, "
             "Redis and the gateway share the machine's cores, so compare rows of one run, not runs.", "",
             f"Saturation: `{tool}` POSTing a generateContent body on {st['conns']} connections for {st['seconds']} s, "
             f"{st.get('rounds', 1)} rounds taken in turn over every configuration; each row is its median round "
             "(all rounds' req/s in brackets). Latency: one connection for "
             f"{st.get('latency_seconds', 5)} s per round (`oha -c 1`), median of the rounds' p50 and p99; added "
             "latency is against the direct run. CPU per request is user + system time over every saturation "
             "round divided by the requests served: the proxy's (gateway replicas, or nginx's master and worker), "
             "the fake upstream's and Redis's apart. nginx `proxy_pass` is one worker with pooled keep-alive "
             "connections to the same fake: the cost of a bare proxy hop. The bare forwarder (`dev/bare-forwarder`) "
             "is actix-web in and awc out with mimalloc on 2 workers and nothing else: the floor of the gateway's "
             "stack. Store round trips are counted by each "
             "replica (`gb_store_command_latency_seconds_count`); Redis commands include those a Lua script runs.",
             ""]
    for p in r["passes"]:
        lines += [f"## Fake upstream answering after {p['upstream_delay_ms']} ms", "",
                  "| config | req/s | × direct | × nginx proxy | × bare forwarder | proxy CPU µs / req | (proxy + Redis) CPU × forwarder | upstream CPU µs / req | Redis CPU µs / req | p50 / p99 ms at saturation | one connection p50 / p99 ms | added p50 / p99 ms | peak RSS MiB | store round trips / req | Redis cmds / req |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in p["configs"]:
            s, o = c["saturation"], c["one_connection"]
            rounds = "(" + ", ".join(str(round(x)) for x in c.get("saturation_rps_rounds", [])) + ")"
            proxy_cpu = "—" if c["config"].startswith("direct") else c.get("cpu_us_per_request", "—")
            upstream_cpu = c.get("cpu_us_per_request") if c["config"].startswith("direct") \
                else c.get("upstream_cpu_us_per_request", "—")
            lines.append(
                f"| {c['config']} | {s['rps']} {rounds} | {c['throughput_vs_direct']} | "
                f"{c.get('throughput_vs_nginx', '—')} | {c.get('throughput_vs_forwarder', '—')} | {proxy_cpu} | "
                f"{c.get('cpu_vs_forwarder', '—') if not c['config'].startswith('direct') else '—'} | {upstream_cpu} | "
                f"{c.get('redis_cpu_us_per_request', '—')} | {s['p50_ms']} / {s['p99_ms']} | "
                f"{o['p50_ms']} / {o['p99_ms']} | {c['added_p50_ms']} / {c['added_p99_ms']} | "
                f"{c.get('peak_rss_mib', '—')} | {c.get('store_round_trips_per_request', '—')} | "
                f"{c.get('redis_commands_per_request', '—')} |")
        redis_rows = [c for c in p["configs"] if c.get("redis_cpu_us_per_request")]
        if redis_rows:
            lines += ["", "Redis cost: " + "; ".join(
                f"{c['config']}: {c['redis_cpu_us_per_request']} µs of Redis CPU and "
                f"{c.get('redis_commands_per_request', '—')} commands per request, so one Redis core "
                f"would saturate at about {round(1e6 / c['redis_cpu_us_per_request'] / 1000)}k req/s (measured below saturation, where Redis batches less: a lower bound)"
                for c in redis_rows) + "."]
        if p.get("traces_exported"):
            t = p["traces_exported"]
            lines += ["", f"Traces: the row \"every trace exported\" sent {t['posts']:,} OTLP posts "
                      f"({round(t['bytes'] / 1048576, 1)} MiB) to the collector during the run; every other gateway row "
                      "runs with `GB_OTLP_ENDPOINT` unset."]
        sfe = p["streaming_first_event"]
        lines += ["", f"Idle RSS of a replica: {p['idle_rss_mib']} MiB. SSE time to first event (200 sequential "
                  f"requests): direct p50 {sfe['direct']['p50_ms']} ms / p99 {sfe['direct']['p99_ms']} ms; through "
                  f"the gateway (Redis) p50 {sfe['gateway_redis']['p50_ms']} ms / p99 {sfe['gateway_redis']['p99_ms']} ms.", ""]
    al = r.get("allocations_per_request")
    if al:
        lines += ["## Allocations per request", "",
                  "Heap allocations (a `realloc` counts as one) per generate request, counted by the allocator of a "
                  "gateway built with `--features count-allocations`, over 3 s on 16 connections after a warm-up: "
                  + "; ".join(f"{k}: {v}" for k, v in al.items()) + ".", ""]
    sm = r.get("streams")
    if sm:
        ss = sm["settings"]
        lines += [f"## {ss['streams']:,} concurrent SSE streams", "",
                  f"Each stream gets {ss['events']} events, one every {ss['interval_ms']} ms; the client "
                  f"(bench/streams.py) opens all {ss['streams']:,} within {ss['ramp']} s and holds them. The gateway "
                  "reaches the fake over TLS with HTTP/2, as it reaches Google; nginx (two workers, so that neither "
                  "exceeds the per-process open-file limit of "
                  f"{sm['nofile_limit']:,}) and the direct run reach its plain-HTTP port. First-event time runs "
                  "from the start of the TCP connect. RSS and file descriptors are the serving processes' peak.", "",
                  "| target | errors | streams with every event | first event p50 / p99 ms | p99 above direct ms | peak RSS MiB | RSS per stream KiB | CPU s | peak fds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in sm["rows"]:
            lines.append(
                f"| {x['target']} | {x['errors']} | {x['complete']:,} | {x['first_event_p50_ms']} / "
                f"{x['first_event_p99_ms']} | {x.get('first_event_p99_above_direct_ms', '—')} | {x['peak_rss_mib']} | "
                f"{x['rss_per_stream_kib']} | {x['cpu_s']} | {x['peak_fds']:,} |")
        lines.append("")
    up = r["upload"]
    lines += ["## Upload", "", f"{up['upload_mib']} MiB through one replica as one resumable chunk: peak RSS "
              f"{up['peak_rss_mib']} MiB (idle {up['idle_rss_mib']} MiB), {up['throughput_mib_s']} MiB/s.", ""]
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(lines))


WRK = os.environ.get("WRK", shutil.which("wrk"))
OHA = os.environ.get("OHA", shutil.which("oha") or str(ROOT / "bench" / ".tools" / "bin" / "oha"))

if __name__ == "__main__":
    main()
