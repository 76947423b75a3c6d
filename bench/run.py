#!/usr/bin/env python3
"""Gateway vs direct-to-upstream, same machine, same run.

Starts the fake upstream (release build), then measures with `oha`:
direct to the fake; the gateway on the embedded store; the gateway on Redis
(unpinned and session-pinned); three replicas behind nginx (scripts/local-stack);
SSE time to first event; a 1 GiB upload's peak RSS. Writes bench/RESULTS.md
and bench/results.json. Usage: bench/run [--seconds N] [--rate R] [--conns C] [--rounds N]
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release"
KEYS = [f"AIzaBenchKey{i:02d}-abcdefghijklmnop" for i in range(5)]
TOKEN = "bench-token-0123456789"
GENERATE = "/v1beta/models/gemini-2.0-flash:generateContent"
BODY = json.dumps({"contents": [{"parts": [{"text": "hello"}]}]})
CLK = os.sysconf("SC_CLK_TCK")
# Enough connections for the fixed rate to be reached when the fake waits.
FIXED_CONNS = 16


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, stream):
    proc = subprocess.Popen(args, env=env, text=True,
                            stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
                            stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL)
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = pipe.readline()
        if "listening on " in line:
            url = line.split("listening on ", 1)[1].split()[0].split('"')[0]
            # Keep draining so the child never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in pipe], daemon=True).start()
            return proc, url
    proc.kill()
    raise SystemExit(f"{args[0]} did not start")


def proc_stat(pid):
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    kib = {l.split(":")[0]: int(l.split()[1]) for l in status.splitlines() if l.startswith(("VmRSS", "VmHWM"))}
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK
    return kib, cpu


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

    def __init__(self, name, url, pids, redis=None, headers=(), credential=TOKEN, metrics_urls=()):
        self.name, self.url, self.pids = name, url, pids
        # (port, pid) of each Redis server this configuration uses (one, or a
        # cluster's nodes).
        self.redis = [redis] if isinstance(redis, tuple) else list(redis or [])
        self.headers, self.credential, self.metrics_urls = headers, credential, metrics_urls
        self.rounds = []
        self.cpu = self.redis_cpu = 0.0
        self.redis_cmds = self.trips = 0
        self.fixed_rounds = []


def saturate(c, args):
    """One saturation round of `c`, adding its costs to the totals."""
    before = [proc_stat(p)[1] for p in c.pids]
    rcpu0 = sum(proc_stat(pid)[1] for _, pid in c.redis)
    calls0 = sum(redis_calls(port) for port, _ in c.redis)
    trips0 = store_calls(c.metrics_urls) if c.metrics_urls else 0
    sat = oha(c.url + GENERATE, args.seconds, args.conns, headers=c.headers, credential=c.credential)
    c.cpu += sum(proc_stat(p)[1] for p in c.pids) - sum(before)
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
    fixed = {k: round(statistics.median(r[k] for r in c.fixed_rounds), 3)
             for k in ("rps", "p50_ms", "p99_ms", "p99_9_ms")}
    fixed["requests"] = sum(r["requests"] for r in c.fixed_rounds)
    row = {"config": c.name, "saturation": rounds[len(rounds) // 2],
           "saturation_rps_rounds": [r["rps"] for r in c.rounds], "fixed_rate": fixed,
           "fixed_rate_p99_rounds": [r["p99_ms"] for r in c.fixed_rounds]}
    total = sum(r["requests"] for r in c.rounds)
    if c.pids:
        row["cpu_s_per_1000"] = round(c.cpu / max(1, total) * 1000, 3)
        row["peak_rss_mib"] = round(max(proc_stat(p)[0]["VmHWM"] for p in c.pids) / 1024, 1)
    if c.redis:
        # Commands run inside a Lua script count here too.
        row["redis_commands_per_request"] = round(c.redis_cmds / max(1, total), 3)
        row["redis_cpu_s_per_1000"] = round(c.redis_cpu / max(1, total) * 1000, 3)
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
        gwr, gwr_url = start([str(BIN / "gemini-balancer")], gateway_env(fake_url, redis_port), "stderr")
        procs.append(gwr)
        cluster_dir = tempfile.mkdtemp(prefix="gb-bench-cluster-")
        cluster = start_cluster(cluster_dir)
        procs += [p for _, p in cluster]
        cenv = gateway_env(fake_url)
        cenv["GB_REDIS_MODE"] = "cluster"
        cenv["GB_REDIS_URL"] = ",".join(f"redis://127.0.0.1:{p}" for p, _ in cluster[:3])
        gwc, gwc_url = start([str(BIN / "gemini-balancer")], cenv, "stderr")
        procs.append(gwc)
        # The direct run authenticates with a real key of the fake.
        configs = [
            Config("direct to the fake", fake_url, [fake.pid], credential=KEYS[0]),
            Config("gateway, embedded store", gw_url, [gw.pid], metrics_urls=[gw_url]),
            Config("gateway, Redis", gwr_url, [gwr.pid], (redis_port, redis.pid), metrics_urls=[gwr_url]),
            Config("gateway, Redis, session-pinned", gwr_url, [gwr.pid], (redis_port, redis.pid),
                   headers=("x-session-id: bench-session",), metrics_urls=[gwr_url]),
            Config("gateway, Redis Cluster (3 masters)", gwc_url, [gwc.pid],
                   [(port, proc.pid) for port, proc in cluster], metrics_urls=[gwc_url]),
        ]
        if shutil.which("nginx") or pathlib.Path("/usr/sbin/nginx").exists():
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
            configs.append(Config("3 replicas + nginx, Redis", info["LB_URL"], pids,
                                  (int(info["REDIS_PORT"]), redis_pid), metrics_urls=urls))
        for r in range(args.rounds):
            print(f"{delay_ms} ms upstream, round {r + 1} of {args.rounds}", flush=True)
            for c in configs:
                saturate(c, args)
            for c in configs:
                c.fixed_rounds.append(oha(c.url + GENERATE, args.seconds, FIXED_CONNS, rate=args.rate,
                                          headers=c.headers, credential=c.credential))
        rows = [summary(c, args) for c in configs]
        extra["streaming_first_event"] = {"direct": ttfb(fake_url, credential=KEYS[0]), "gateway_redis": ttfb(gwr_url)}
    finally:
        if stack_dir:
            subprocess.run(["bash", str(ROOT / "scripts" / "local-stack"), "stop", stack_dir], env=env)
        for p in procs:
            p.kill()
    direct = rows[0]
    for r in rows:
        r["throughput_vs_direct"] = round(r["saturation"]["rps"] / direct["saturation"]["rps"], 3)
        r["added_p50_ms"] = round(r["fixed_rate"]["p50_ms"] - direct["fixed_rate"]["p50_ms"], 3)
        r["added_p99_ms"] = round(r["fixed_rate"]["p99_ms"] - direct["fixed_rate"]["p99_ms"], 3)
    return {"upstream_delay_ms": delay_ms, "configs": rows, **extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate", type=int, default=300)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="saturation runs per configuration (median reported)")
    ap.add_argument("--delays-ms", default="0,20",
                    help="the fake's added latency per model call, one pass each")
    ap.add_argument("--upload-mib", type=int, default=1024)
    args = ap.parse_args()
    passes = [run_pass(args, int(d)) for d in args.delays_ms.split(",")]
    upload = subprocess.run([sys.executable, str(ROOT / "bench" / "upload_rss.py"), str(args.upload_mib)],
                            capture_output=True, text=True, check=True)
    upload = json.loads(upload.stdout)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, "
               f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, Linux {platform.release()}")
    results = {"command": "bench/run " + " ".join(sys.argv[1:]), "machine": machine, "settings": vars(args),
               "passes": passes, "upload": upload}
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)
    print((ROOT / "bench" / "RESULTS.md").read_text())


def write_markdown(r):
    st = r["settings"]
    lines = ["# Benchmark results", "",
             f"Command: `{r['command']}` — machine: {r['machine']}. The load generator (`oha`), the fake "
             "upstream, Redis and the gateway share the machine's cores, so compare rows of one run, not runs.", "",
             f"Saturation: {st['conns']} connections for {st['seconds']} s, {st.get('rounds', 1)} rounds taken in "
             "turn over every configuration; each row is its median round (all rounds' req/s in brackets). "
             f"Fixed rate: {st['rate']} req/s on {FIXED_CONNS} connections for {st['seconds']} s in each round, "
             "median of the rounds' p50 and p99; added latency is against the direct run at the same rate. CPU is the processes' user + system time over every "
             "saturation round (the gateway's or, for the direct run, the fake's; Redis separately). Store round "
             "trips are counted by each replica (`gb_store_command_latency_seconds_count`); Redis commands "
             "include those a Lua script runs.", ""]
    for p in r["passes"]:
        lines += [f"## Fake upstream answering after {p['upstream_delay_ms']} ms", "",
                  "| config | req/s | × direct | p50 ms | p99 ms | p99.9 ms | fixed-rate p50 / p99 ms | added p50 / p99 ms | CPU s / 1000 req | Redis CPU s / 1000 req | peak RSS MiB | store round trips / req | Redis cmds / req |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in p["configs"]:
            s, f = c["saturation"], c["fixed_rate"]
            rounds = "(" + ", ".join(str(round(x)) for x in c.get("saturation_rps_rounds", [])) + ")"
            lines.append(
                f"| {c['config']} | {s['rps']} {rounds} | {c['throughput_vs_direct']} | {s['p50_ms']} | {s['p99_ms']} | "
                f"{s['p99_9_ms']} | {f['p50_ms']} / {f['p99_ms']} | {c['added_p50_ms']} / {c['added_p99_ms']} | "
                f"{c.get('cpu_s_per_1000', '—')} | {c.get('redis_cpu_s_per_1000', '—')} | {c.get('peak_rss_mib', '—')} | "
                f"{c.get('store_round_trips_per_request', '—')} | {c.get('redis_commands_per_request', '—')} |")
        sfe = p["streaming_first_event"]
        lines += ["", f"Idle RSS of a replica: {p['idle_rss_mib']} MiB. SSE time to first event (200 sequential "
                  f"requests): direct p50 {sfe['direct']['p50_ms']} ms / p99 {sfe['direct']['p99_ms']} ms; through "
                  f"the gateway (Redis) p50 {sfe['gateway_redis']['p50_ms']} ms / p99 {sfe['gateway_redis']['p99_ms']} ms.", ""]
    up = r["upload"]
    lines += [f"## Upload", "", f"{up['upload_mib']} MiB through one replica as one resumable chunk: peak RSS "
              f"{up['peak_rss_mib']} MiB (idle {up['idle_rss_mib']} MiB), {up['throughput_mib_s']} MiB/s.", ""]
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(lines))


OHA = os.environ.get("OHA", shutil.which("oha") or str(ROOT / "bench" / ".tools" / "bin" / "oha"))

if __name__ == "__main__":
    main()
