"""What the benchmark scripts share: the binaries, the credentials, starting
a process that prints `listening on URL`, and reading a process's costs."""

import os
import shutil
import signal
import pathlib
import socket
import subprocess
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The release build; the test suite points BENCH_BIN_DIR at its debug build
# to run a small streams benchmark as a test.
BIN = pathlib.Path(os.environ.get("BENCH_BIN_DIR", ROOT / "target" / "release"))
KEYS = [f"AIzaBenchKey{i:02d}-abcdefghijklmnop" for i in range(5)]
TOKEN = "bench-token-0123456789"
CLK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, stream, marker="listening on ", before=None):
    """Starts `args` and waits for its `listening on URL` line on `stream`.
    With `before`, a line with that marker printed first (the fake's plain
    `control on URL` over TLS) is kept as `proc.control_url`."""
    proc = subprocess.Popen(args, env=env, text=True,
                            stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
                            stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL)
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    proc.control_url = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = pipe.readline()
        if before and before in line:
            proc.control_url = line.split(before, 1)[1].split()[0]
        if marker in line:
            url = line.split(marker, 1)[1].split()[0].split('"')[0]
            # Keep draining so the child never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in pipe], daemon=True).start()
            return proc, url
    proc.kill()
    raise SystemExit(f"{args[0]} did not start")


def proc_stat(pid):
    """({VmRSS, VmHWM} in KiB, user + system CPU seconds) of a process."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    kib = {l.split(":")[0]: int(l.split()[1]) for l in status.splitlines() if l.startswith(("VmRSS", "VmHWM"))}
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK
    return kib, cpu


def nginx_conf(prefix, listen_port, upstream, workers=1):
    """nginx as a plain `proxy_pass` hop: `workers` worker processes, pooled
    keep-alive connections to `upstream` (host:port), no buffering (streams
    pass event by event), no access log."""
    return f"""
worker_processes {workers};
worker_rlimit_nofile 19000;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 18000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  upstream fake {{ server {upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{listen_port} backlog=16384;
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 60s;
    }}
  }}
}}
"""


def start_nginx(workdir, upstream, workers=1):
    """nginx in front of `upstream` (host:port); (process, url, [master and
    worker pids])."""
    prefix = pathlib.Path(workdir, "nginx")
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, upstream, workers))
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("nginx did not start: " + (prefix / "error.log").read_text()[-500:])
        time.sleep(0.05)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    return Nginx(proc, workers), f"http://127.0.0.1:{port}", [proc.pid] + workers


class Nginx:
    """nginx's master; `kill` takes its workers down too (killed alone, the
    master would leave them running)."""

    def __init__(self, proc, workers):
        self.proc, self.workers, self.pid = proc, workers, proc.pid

    def kill(self):
        for pid in [self.proc.pid] + self.workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def have_nginx():
    return bool(shutil.which("nginx")) or pathlib.Path("/usr/sbin/nginx").exists()
