"""End-to-end harness: the real SDKs against real gateway processes.

Starts a redis-server on a free port, the fake upstream, and gateway replicas
from the binaries in GB_BIN_DIR (default target/debug), and tears them down.
"""

import json
import os
import pathlib
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN_DIR = pathlib.Path(os.environ.get("GB_BIN_DIR", ROOT / "target" / "debug"))
KEYS = [f"AIzaE2eKey{i:02d}-abcdefghijklmnop" for i in range(4)]
TOKEN = "e2e-token-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output is collected; killed on stop()."""

    def __init__(self, args, env, stream="stdout"):
        self.lines = []
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL,
            text=True,
        )
        self.pipe = self.proc.stdout if stream == "stdout" else self.proc.stderr
        self.url = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.pipe.readline()
            if not line:
                break
            self.lines.append(line)
            if "listening on " in line:
                self.url = line.split("listening on ", 1)[1].split()[0].split('"')[0]
                break
        if self.url is None:
            self.stop()
            raise RuntimeError(f"{args[0]} did not start:\n{''.join(self.lines)}")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.pipe:
            self.lines.append(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class Redis:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if b"PONG" in s.recv(64):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


class Fake:
    def __init__(self, url=None):
        self.proc = None
        if url is None:
            env = dict(os.environ, FAKE_KEYS=",".join(KEYS), FAKE_LISTEN="127.0.0.1:0")
            self.proc = Proc([str(BIN_DIR / "fake-gemini")], env, "stdout")
            url = self.proc.url
        self.url = url

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def requests(self):
        return self._call("GET", "/_fake/requests")

    def served(self):
        return self._call("GET", "/_fake/served")

    def file_owners(self):
        return self._call("GET", "/_fake/files")

    def resource_owners(self):
        return self._call("GET", "/_fake/resources")

    def reset(self):
        self._call("POST", "/_fake/reset", {})

    def set_mode(self, key, mode):
        self._call("POST", f"/_fake/keys/{key}", mode)


class Stack:
    """Redis, the fake, and N gateway replicas on that Redis."""

    def __init__(self, replicas=3, extra_env=None):
        self.redis = Redis()
        self.fake = Fake()
        self.gateways = []
        for _ in range(replicas):
            env = {
                "PATH": os.environ.get("PATH", ""),
                "GB_LISTEN": "127.0.0.1:0",
                "GB_API_KEYS": ",".join(KEYS),
                "GB_AUTH_TOKENS": TOKEN,
                "GB_UPSTREAM_URL": self.fake.url,
                "GB_REDIS_URL": self.redis.url,
                "RUST_LOG": "info",
            }
            env.update(extra_env or {})
            self.gateways.append(Proc([str(BIN_DIR / "gemini-balancer")], env, "stderr"))
        self.urls = [g.url for g in self.gateways]

    def logs(self):
        return "".join(line for g in self.gateways for line in g.lines)

    def stop(self):
        for g in self.gateways:
            g.stop()
        self.fake.proc.stop()
        self.redis.stop()


@pytest.fixture
def stack():
    s = Stack()
    yield s
    s.stop()
    logs = s.logs()
    for secret in KEYS + [TOKEN]:
        assert secret not in logs, "a key or token was logged"
