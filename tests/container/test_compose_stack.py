"""The deployment files, run: the image built from the Dockerfile and the
docker-compose stack (demo profile: nginx, three replicas, Redis with AOF,
the fake upstream), driven through nginx's published port with the real
google-genai SDK, then faults; the monitoring profile's Prometheus scraping
every replica.

The test starts its own dockerd (own data root, exec root and socket), makes
the base images locally (scripts/base-images: debootstrap + docker import,
cached under GB_DOCKER_CACHE), builds the release image and the fake's image,
and removes everything it made at the end. Where dockerd cannot start it
skips, loudly.
"""

import collections
import datetime
import http.client
import io
import json
import os
import pathlib
import queue
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from conftest import KEYS, TOKEN, Fake, free_port  # noqa: E402

ADMIN = "container-admin-token-0123"
MODEL = "gemini-2.0-flash"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
PROJECT = "gbstack"
CACHE = pathlib.Path(os.environ.get(
    "GB_DOCKER_CACHE", pathlib.Path.home() / ".cache" / "gemini-balancer-test" / "base-images"))
BASES = {
    "BUILDER_IMAGE": "gb-base/builder:bookworm",
    "RUNTIME_IMAGE": "gb-base/runtime:bookworm",
}


def say(msg):
    print(f"[container-stack] {msg}", flush=True)


def loud_skip(reason):
    bar = "=" * 72
    sys.__stderr__.write(f"\n{bar}\nSKIP container stack: {reason}\n{bar}\n")
    sys.__stderr__.flush()
    pytest.skip(reason)


def wait_for(what, check, timeout=120, interval=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - polled until the deadline
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


class Dockerd:
    """A dockerd of the test's own, reached through DOCKER_HOST."""

    def __init__(self):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="gbd-", dir="/tmp"))
        self.sock = self.dir / "docker.sock"
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_BUILDKIT="0",
                        COMPOSE_DOCKER_CLI_BUILD="0")
        self.log = open(self.dir / "dockerd.log", "w")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
             "--pidfile", str(self.dir / "dockerd.pid"), "-H", f"unix://{self.sock}",
             "--iptables=false", "--ip6tables=false", "--bridge=none"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.run("docker", "info", check=False, quiet=True).returncode == 0:
                return True
            time.sleep(0.5)
        return False

    def log_tail(self, n=30):
        try:
            return "".join((self.dir / "dockerd.log").read_text().splitlines(True)[-n:])
        except OSError:
            return ""

    def run(self, *args, check=True, quiet=False, cwd=None, env=None, timeout=600, input=None):
        out = subprocess.run(list(args), env=dict(self.env, **(env or {})), cwd=cwd, input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def stream(self, *args, cwd=None, env=None, keep=lambda line: True, timeout=3600):
        """Runs a long command, printing the lines `keep` selects."""
        tail = []
        proc = subprocess.Popen(list(args), env=dict(self.env, **(env or {})), cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            tail = (tail + [line])[-80:]
            if keep(line):
                say(line.rstrip())
            if time.monotonic() > deadline:
                proc.kill()
        rc = proc.wait()
        if rc != 0:
            raise AssertionError(f"{' '.join(args)} failed ({rc}):\n{''.join(tail)}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()
        # What dockerd may leave mounted (its network namespace), then the
        # directory.
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f]
        for m in reversed(mounts):
            if m.startswith(str(self.dir) + "/"):
                subprocess.run(["umount", "-l", m], check=False)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)
        assert not self.dir.exists(), f"{self.dir} could not be removed"


class Compose:
    def __init__(self, docker, workdir, env, project=PROJECT, files=(), profiles=("demo",)):
        self.docker = docker
        self.dir = workdir
        self.env = env
        self.project = project
        self.files = [a for f in files for a in ("-f", f)]
        self.profiles = [a for p in profiles for a in ("--profile", p)]

    def __call__(self, *args, check=True, timeout=600):
        return self.docker.run("docker-compose", "-p", self.project, *self.files, *self.profiles, *args,
                               cwd=self.dir, env=self.env, check=check, timeout=timeout)

    def container(self, service):
        cid = self("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def logs(self, service):
        out = self.docker.run("docker", "logs", self.container(service), check=False)
        return out.stdout + out.stderr


def build_keep(line):
    return line.startswith(("Step ", "Successfully", " ---> Using cache")) or "Finished" in line \
        or re.search(r"\berror(\[|:)", line) is not None


@pytest.fixture(scope="module")
def env():
    started = time.monotonic()
    if os.geteuid() != 0:
        loud_skip("needs root to run dockerd and debootstrap")
    for tool in ("dockerd", "docker", "docker-compose", "debootstrap"):
        if not shutil.which(tool):
            loud_skip(f"{tool} is not installed (scripts/test installs docker.io, docker-compose, debootstrap)")
    docker = Dockerd()
    if not docker.ready():
        tail = docker.log_tail()
        docker.stop()
        loud_skip(f"dockerd could not start here:\n{tail}")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gb-compose-"))
    compose = None
    try:
        t0 = time.monotonic()
        docker.stream("bash", str(ROOT / "scripts" / "base-images"), str(CACHE))
        say(f"base images ready in {time.monotonic() - t0:.0f} s")

        t0 = time.monotonic()
        args = [f"--build-arg={k}={v}" for k, v in BASES.items()]
        docker.stream("docker", "build", "--network", "host", *args, "-t", "gemini-balancer:latest",
                      str(ROOT), keep=build_keep)
        docker.stream("docker", "build", "--network", "host", *args, "--target", "fake",
                      "-t", "gemini-balancer-fake:latest", str(ROOT), keep=build_keep)
        say(f"images built in {time.monotonic() - t0:.0f} s")

        shutil.copy(ROOT / "docker-compose.yml", workdir)
        shutil.copy(ROOT / "docker-compose.cluster.yml", workdir)
        shutil.copytree(ROOT / "deploy", workdir / "deploy")
        port = free_port()
        (workdir / ".env").write_text(
            f"GB_API_KEYS={','.join(KEYS)}\n"
            f"GB_AUTH_TOKENS={TOKEN}\n"
            f"GB_ADMIN_TOKEN={ADMIN}\n"
            f"GB_PUBLIC_URL=http://127.0.0.1:{port}\n"
            "GB_UPSTREAM_URL=http://fake-gemini:8000\n")
        compose = Compose(docker, workdir, {
            "REDIS_IMAGE": "gb-base/redis:bookworm",
            "NGINX_IMAGE": "gb-base/nginx:bookworm",
            "PROMETHEUS_IMAGE": "gb-base/prometheus:bookworm",
            "GB_HTTP_ADDR": "127.0.0.1",
            "GB_HTTP_PORT": str(port),
        })
        t0 = time.monotonic()
        compose("up", "-d", "--no-build")
        ctx = {"docker": docker, "compose": compose, "url": f"http://127.0.0.1:{port}", "port": port}
        wait_until_serving(ctx)
        say(f"compose stack serving in {time.monotonic() - t0:.0f} s")
        yield ctx
    finally:
        try:
            if compose is not None:
                for service in ("gateway-1", "gateway-2", "gateway-3"):
                    logs = compose.logs(service) if compose("ps", "-q", service, check=False).stdout.strip() else ""
                    for secret in KEYS + [TOKEN, ADMIN]:
                        assert secret not in logs, f"a key or token was logged by {service}"
        finally:
            cleanup(docker, compose)
            shutil.rmtree(workdir, ignore_errors=True)
            say(f"docker part took {time.monotonic() - started:.0f} s in all")


def cleanup(docker, compose):
    if compose is not None:
        compose("down", "-v", "--remove-orphans", "--rmi", "all", check=False, timeout=300)
    # Whatever is left that the test made: containers, networks, volumes,
    # images (the base images, the intermediate build images).
    ids = docker.run("docker", "ps", "-aq", check=False).stdout.split()
    if ids:
        docker.run("docker", "rm", "-f", *ids, check=False)
    docker.run("docker", "network", "prune", "-f", check=False)
    docker.run("docker", "volume", "prune", "-f", check=False)
    docker.run("docker", "image", "prune", "-af", check=False, timeout=600)
    left = {
        "containers": docker.run("docker", "ps", "-aq", check=False).stdout.split(),
        "volumes": docker.run("docker", "volume", "ls", "-q", check=False).stdout.split(),
        "images": docker.run("docker", "images", "-aq", check=False).stdout.split(),
        "networks": [n for n in docker.run("docker", "network", "ls", "--format", "{{.Name}}",
                                            check=False).stdout.split() if n not in ("host", "none", "bridge")],
    }
    docker.stop()
    say(f"removed; left behind: {left}")
    assert not any(left.values()), left


def health(docker, cid):
    out = docker.run("docker", "inspect", "-f", "{{.State.Health.Status}}", cid, check=False)
    return out.stdout.strip()


def wait_until_serving(ctx):
    docker, compose = ctx["docker"], ctx["compose"]
    for service in ("gateway-1", "gateway-2", "gateway-3"):
        cid = compose.container(service)
        wait_for(f"{service} healthy (HEALTHCHECK: gemini-balancer healthcheck)",
                 lambda: health(docker, cid) == "healthy", timeout=180)
    wait_for("nginx answers /healthz", lambda: http_get(ctx["url"] + "/healthz")[0] == 200, timeout=120)
    wait_for("the fake's control port", lambda: fake(ctx).requests() is not None, timeout=60)


def fake(ctx):
    out = ctx["compose"]("port", "fake-gemini", "8000").stdout.strip()
    return Fake(f"http://{out}")


def http_get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def generate(url, body=None, headers=None, timeout=60):
    data = json.dumps(body or {"contents": [{"parts": [{"text": "hello"}]}]}).encode()
    req = urllib.request.Request(url + GENERATE, data=data, method="POST", headers={
        "content-type": "application/json", "x-goog-api-key": TOKEN, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def client(url, headers=None):
    from google import genai
    from google.genai import types
    opts = {"base_url": url, "api_version": "v1beta"}
    if headers:
        opts["headers"] = headers
    return genai.Client(api_key=TOKEN, http_options=types.HttpOptions(**opts))


def upload(c, data, name):
    from google.genai import types
    return c.files.upload(file=io.BytesIO(data),
                          config=types.UploadFileConfig(mime_type="text/plain", display_name=name))


def replicas_by_id(ctx, request_ids):
    """Which gateway service logged each of these request ids (one read of
    each replica's log)."""
    found = {}
    for service in ("gateway-1", "gateway-2", "gateway-3"):
        text = ctx["compose"].logs(service)
        for rid in request_ids:
            if rid not in found and rid in text:
                found[rid] = service
    return found


def replica_of(ctx, request_id):
    """The gateway service whose log carries this request id."""
    def find():
        hits = [s for s in ("gateway-1", "gateway-2", "gateway-3") if request_id in ctx["compose"].logs(s)]
        return hits[0] if hits else None
    return wait_for(f"a replica's log line with request id {request_id}", find, timeout=30)


def use_files(c, files):
    from google.genai import types
    parts = [types.Part.from_uri(file_uri=f.uri, mime_type=f.mime_type) for f in files]
    return c.models.generate_content(model=MODEL, contents=parts + ["Compare these files."])


def binding_keys(ctx):
    """Every binding in Redis (sessions, uploads, files), not heartbeats,
    locks, counters or statistics."""
    out = ctx["compose"]("exec", "-T", "redis", "redis-cli", "--scan", "--pattern", "gb:*").stdout
    skip = (":replica:", ":lock:", ":stats:", ":{ring:", ":layout")
    return {k for k in out.split() if not any(s in k for s in skip)}


STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
Req = collections.namedtuple("Req", "kind rid start end status retry_after")
SLOW = 2.0  # the longest a request may take while a fault is handled


class Load:
    """A steady load through nginx's published port: `rate` requests a
    second, started on a fixed schedule whatever the answers do, in turn a
    generate, an SSE stream (read to its last event) and a generate with a
    session header naming a file uploaded in that session (a binding
    request: the session's key and the file's owner come from the store).
    Each request's kind, request id, start, end, status and Retry-After are
    kept."""

    def __init__(self, port, sessions, tag, rate=20, workers=16):
        self.port, self.sessions, self.tag, self.rate = port, sessions, tag, rate
        self.jobs = queue.Queue()
        self.done = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self.work, daemon=True) for _ in range(workers)]
        self.threads.append(threading.Thread(target=self.tick, daemon=True))
        for t in self.threads:
            t.start()

    def tick(self):
        t0, n = time.monotonic(), 0
        while not self.stop_flag.is_set():
            self.jobs.put(n)
            n += 1
            self.stop_flag.wait(max(0.0, t0 + n / self.rate - time.monotonic()))
        for _ in range(len(self.threads)):
            self.jobs.put(None)

    def work(self):
        while (n := self.jobs.get()) is not None:
            r = self.one(n)
            with self.lock:
                self.done.append(r)

    def one(self, n):
        kind = ("generate", "stream", "file")[n % 3]
        rid = f"{self.tag}-{n}-{uuid.uuid4().hex[:8]}"
        headers = {"content-type": "application/json", "x-goog-api-key": TOKEN, "x-request-id": rid}
        parts, path = [{"text": "hello"}], GENERATE
        if kind == "stream":
            path = STREAM
        elif kind == "file":
            sid, uri = self.sessions[(n // 3) % len(self.sessions)]
            headers["x-session-id"] = sid
            parts = [{"fileData": {"fileUri": uri, "mimeType": "text/plain"}}, {"text": "what is it?"}]
        body = json.dumps({"contents": [{"parts": parts}]})
        start = time.monotonic()
        status, retry_after = None, None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status, retry_after = resp.status, resp.getheader("retry-after")
                if status == 200 and kind == "stream" and b"chunk 2" not in data:
                    status = "stream cut"
            finally:
                conn.close()
        except Exception as e:  # noqa: BLE001 - a failed request is counted
            status = repr(e)[:160]
        return Req(kind, rid, start, time.monotonic(), status, retry_after)

    def count(self):
        with self.lock:
            return len(self.done)

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=180)
        with self.lock:
            return sorted(self.done, key=lambda r: r.start)


def load_sessions(url, n=3):
    """n sessions, each with a file uploaded in it: what the load's binding
    requests name."""
    out = []
    for i in range(n):
        sid = str(uuid.uuid4())
        f = upload(client(url, {"X-Session-Id": sid}), f"session file {i}".encode(), f"s{i}")
        out.append((sid, f.uri))
    return out


def report(what, reqs, t0, marks=()):
    """Prints a fault's figures, times relative to the fault (t0)."""
    failed = [r for r in reqs if r.status != 200]
    slowest = max(reqs, key=lambda r: r.end - r.start)
    affected = [r for r in reqs if r.status != 200 or r.end - r.start > 0.5]
    kinds = collections.Counter((r.kind, str(r.status)) for r in failed)
    say(f"{what}: {len(reqs)} requests in {reqs[-1].start - reqs[0].start:.0f} s, {len(failed)} failed "
        f"{dict(kinds)}; slowest {slowest.end - slowest.start:.3f} s ({slowest.kind}, started "
        f"{slowest.start - t0:+.2f} s); last failed or > 0.5 s request ended "
        + (f"{max(r.end for r in affected) - t0:+.2f} s" if affected else "never")
        + "".join(f"; {k} {v - t0:+.2f} s" for k, v in marks))
    for r in failed[:10]:
        say(f"  failed {r.kind} {r.start - t0:+.3f} s .. {r.end - t0:+.3f} s: {r.status} retry-after={r.retry_after}")
    return failed


def assert_fast(reqs):
    slow = [r for r in reqs if r.end - r.start > SLOW]
    assert not slow, f"{len(slow)} requests took more than {SLOW} s, e.g. {slow[0]}"


def assert_only_in_flight_failed(failed, t_kill, t_killed):
    # Only what the dying replica was already handling may fail: none that
    # ended before the kill began, none that started after it was done.
    for r in failed:
        assert r.end >= t_kill and r.start <= t_killed, \
            f"a request not in flight at the kill failed: {r.kind} {r.status} " \
            f"{r.start - t_kill:+.3f} s .. {r.end - t_kill:+.3f} s"


class Pinger:
    """`redis-cli ping` in a container, over and over: (start, end, ok)."""

    def __init__(self, docker, cid):
        self.docker, self.cid = docker, cid
        self.seen = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop_flag.is_set():
            start = time.monotonic()
            out = self.docker.run("docker", "exec", self.cid, "redis-cli", "ping", check=False, timeout=30)
            self.seen.append((start, time.monotonic(), "PONG" in out.stdout))
            self.stop_flag.wait(0.05)

    def back_after(self, t, restarted=None):
        """The start of the first successful ping after one that failed
        after t: Redis accepted connections again by then (at most one ping
        earlier). A restart can fall between two pings (one `docker exec`
        spanning it): then the first successful ping that started after the
        restart command returned (`restarted`)."""
        down = False
        for start, _, ok in list(self.seen):
            if start < t:
                continue
            if not ok:
                down = True
            elif down or (restarted is not None and start >= restarted):
                return start
        return None

    def first_failure_after(self, t):
        return next((s for s, _, ok in list(self.seen) if s >= t and not ok), None)

    def stop(self):
        self.stop_flag.set()
        self.thread.join(timeout=60)


class NetPinger:
    """`redis-cli -h redis ping` every 20 ms from a container of its own on
    the stack's network: when Redis answers as the replicas reach it (by
    name, over the network), which can be later than a ping inside Redis's
    own container says. Times are wall-clock in the container, mapped to
    this process's monotonic clock (one kernel, one clock)."""

    LOOP = ('while :; do t=$(date +%s.%N); '
            'if timeout 1 redis-cli -h redis ping 2>/dev/null | grep -q PONG; '
            'then echo "$t ok"; else echo "$t no"; fi; sleep 0.02; done')

    def __init__(self, docker, network):
        self.docker = docker
        self.cid = docker.run("docker", "run", "-d", "--network", network, "--entrypoint", "sh",
                              "gb-base/redis:bookworm", "-c", self.LOOP).stdout.strip()

    def seen(self):
        out = self.docker.run("docker", "logs", self.cid, check=False).stdout
        offset = time.time() - time.monotonic()
        pings = []
        for line in out.splitlines():
            t, _, ok = line.partition(" ")
            try:
                pings.append((float(t) - offset, ok == "ok"))
            except ValueError:
                continue
        return pings

    def back_after(self, t, restarted=None):
        """The first ping that answered after one that failed after t, or,
        when the restart fell between two pings, the first that answered
        after the restart command returned (`restarted`)."""
        down = False
        for start, ok in self.seen():
            if start < t:
                continue
            if not ok:
                down = True
            elif down or (restarted is not None and start >= restarted):
                return start
        return None

    def stop(self):
        self.docker.run("docker", "rm", "-f", self.cid, check=False)


def store_events(ctx, t0, rids=()):
    """The replicas' log lines about the state store (circuit opened or
    closed, a request refused for want of it) and those of the given
    request ids, with times relative to t0 (a monotonic time)."""
    offset = time.time() - time.monotonic()
    marks = ("circuit", "state store", "store probe") + tuple(rids)
    for service in ("gateway-1", "gateway-2", "gateway-3"):
        out = ctx["docker"].run("docker", "logs", "--timestamps", ctx["compose"].container(service), check=False)
        for line in (out.stdout + out.stderr).splitlines():
            stamp, _, text = line.partition(" ")
            if not any(m in text for m in marks):
                continue
            try:
                wall = datetime.datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()
            except ValueError:
                continue
            at = wall - offset - t0
            if -30 < at < 60:
                say(f"  {service} {at:+.3f} s: {text[:240]}")


STATE = {}


def test_the_release_image_holds_the_gateway_only(env):
    docker = env["docker"]
    size = int(docker.run("docker", "image", "inspect", "-f", "{{.Size}}", "gemini-balancer:latest").stdout)
    listing = docker.run("docker", "run", "--rm", "--entrypoint", "ls", "gemini-balancer:latest",
                         "-la", "/usr/local/bin").stdout
    say(f"release image gemini-balancer:latest: {size / 1e6:.1f} MB; /usr/local/bin:\n{listing}")
    names = {line.split()[-1] for line in listing.splitlines()[1:] if line.split()[-1] not in (".", "..")}
    assert names == {"gemini-balancer"}, listing
    cfg = json.loads(docker.run("docker", "image", "inspect", "gemini-balancer:latest").stdout)[0]["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Healthcheck"]["Test"] == ["CMD", "gemini-balancer", "healthcheck"]
    for var in cfg.get("Env") or []:
        assert not var.startswith(("GB_API_KEYS", "GB_AUTH_TOKENS", "GB_ADMIN_TOKEN")), var
    fake_bin = docker.run("docker", "run", "--rm", "--entrypoint", "ls", "gemini-balancer-fake:latest",
                          "/usr/local/bin").stdout.split()
    assert set(fake_bin) == {"fake-gemini", "test-proxy"}


def seed_flow(env):
    """Uploads of one session until two replicas took one, then the files
    used together."""
    url = env["url"]
    sid = str(uuid.uuid4())
    files, replicas = [], []
    for i in range(6):
        rid = f"seed-{uuid.uuid4().hex}"
        f = upload(client(url, {"X-Session-Id": sid, "x-request-id": rid}), f"file {i}".encode(), f"f{i}")
        files.append(f)
        replicas.append(replica_of(env, rid))
        if len(set(replicas)) >= 2:
            break
    assert len(set(replicas)) >= 2, f"every upload landed on {replicas}"
    first = files[0]
    other = next(f for f, r in zip(files, replicas) if r != replicas[0])
    say(f"uploads of session {sid[:8]}… started on {replicas}")
    owners = fake(env).file_owners()
    assert owners[first.name] == owners[other.name], "one session, one key"
    r = use_files(client(url), [first, other])
    assert "2 files" in r.text, r.text
    return {"sid": sid, "files": [first, other], "owner": owners[first.name]}


def test_seed_flow_two_uploads_of_one_session_on_different_replicas(env):
    STATE.update(seed_flow(env))


def test_one_sse_stream_event_by_event_through_nginx(env):
    conn = http.client.HTTPConnection("127.0.0.1", env["port"], timeout=60)
    body = json.dumps({"contents": [{"parts": [{"text": "hello"}]}]})
    conn.request("POST", f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse", body=body, headers={
        "content-type": "application/json", "x-goog-api-key": TOKEN, "x-fake-hold": "container-sse"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-type").startswith("text/event-stream")

    def event():
        lines = []
        while True:
            line = resp.readline()
            assert line, "the stream ended early"
            if line in (b"\r\n", b"\n"):
                if lines:
                    return b"".join(lines).decode()
                continue
            lines.append(line)

    # The fake holds the rest of the stream until released: the first event
    # arrives only if nginx passes it on as it comes.
    first = event()
    assert "chunk 0" in first and "chunk 1" not in first, first
    fake(env)._call("POST", "/_fake/release/container-sse", {})
    rest = [event(), event()]
    assert "chunk 1" in rest[0] and "chunk 2" in rest[1], rest
    for e in [first] + rest:
        assert e.startswith("data: ") and json.loads(e[len("data: "):])["candidates"]
    conn.close()


def test_a_256_mib_upload_through_nginx(env):
    size = 256 << 20
    f = upload(client(env["url"]), b"\0" * size, "big")
    assert int(f.size_bytes) == size
    r = use_files(client(env["url"]), [f])
    assert "1 files" in r.text, r.text


def test_metrics_and_admin_are_internal_only(env):
    url = env["url"]
    for path in ("/metrics", "/admin", "/admin/", "/admin/api/keys", "/%61dmin/api/keys"):
        status, body = http_get(url + path, {"authorization": f"Bearer {ADMIN}"})
        assert status == 404, f"{path} through the public port: {status} {body}"
    # The internal listener, as Prometheus (deploy/prometheus/prometheus.yml)
    # and an operator on the compose network reach it.
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == ["gateway-1:9000", "gateway-2:9000", "gateway-3:9000"]
    network = f"{PROJECT}_default"
    script = "\n".join(
        f'exec 3<>/dev/tcp/{t.split(":")[0]}/{t.split(":")[1]} && '
        f'printf "GET /metrics HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n" >&3 && head -c 100000 <&3 | tr -d "\\r"; exec 3<&-'
        for t in targets)
    out = env["docker"].run("docker", "run", "--rm", "--network", network, "gb-base/runtime:bookworm",
                            "bash", "-c", script).stdout
    assert len(re.findall(r"^HTTP/1\.[01] 200 ", out, re.M)) == 3, out[:2000]
    assert "gb_requests_total" in out
    admin = env["docker"].run(
        "docker", "run", "--rm", "--network", network, "gb-base/runtime:bookworm", "bash", "-c",
        'exec 3<>/dev/tcp/gateway-2/9000 && printf "GET /admin/api/keys HTTP/1.0\\r\\n'
        f'Authorization: Bearer {ADMIN}\\r\\n\\r\\n" >&3 && cat <&3').stdout
    assert re.match(r"HTTP/1\.[01] 200 ", admin), admin[:500]
    assert '"masked"' in admin and not any(k in admin for k in KEYS), "the admin API never shows a key"
    for service in ("gateway-1", "gateway-2", "gateway-3"):
        ports = env["docker"].run("docker", "port", env["compose"].container(service)).stdout
        assert ports.strip() == "", f"{service} publishes {ports}"


def test_monitoring_profile_prometheus_scrapes_every_replica_with_the_rules(env):
    """The `monitoring` profile on the running stack: its Prometheus (Debian's,
    as PROMETHEUS_IMAGE) scrapes each replica's internal port and has loaded
    every rule of deploy/prometheus/alerts.yml."""
    monitoring = Compose(env["docker"], env["compose"].dir, env["compose"].env, profiles=("demo", "monitoring"))
    t0 = time.monotonic()
    monitoring("up", "-d", "--no-build", "prometheus")
    try:
        url = "http://" + monitoring("port", "prometheus", "9090").stdout.strip()

        def api(path):
            status, body = http_get(f"{url}/api/v1/{path}")
            assert status == 200, body
            return json.loads(body)["data"]

        def all_up():
            targets = api("targets")["activeTargets"]
            up = sorted(t["labels"]["instance"] for t in targets if t["health"] == "up")
            return up if up == ["gateway-1:9000", "gateway-2:9000", "gateway-3:9000"] else None

        wait_for("Prometheus scraping every replica", all_up, timeout=120)
        say(f"monitoring profile: every replica's target up {time.monotonic() - t0:.0f} s after `up`")
        loaded = {r["name"] for g in api("rules")["groups"] for r in g["rules"]}
        shipped = {r["alert"] for g in yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
                   ["groups"] for r in g["rules"]}
        assert loaded == shipped, loaded ^ shipped
        # Samples from every replica (each counts the scrapes it answered).
        wait_for("gb_requests_total from every replica", lambda: sorted(
            s["metric"]["instance"] for s in api("query?query=count+by+(instance)+(gb_requests_total)")["result"])
            == ["gateway-1:9000", "gateway-2:9000", "gateway-3:9000"], timeout=60)
    finally:
        monitoring("rm", "-s", "-f", "-v", "prometheus", check=False)


def test_fault_docker_kill_of_a_replica_that_stays_dead(env):
    """`docker kill` of a replica that stays dead under a steady load: nginx
    stops sending to it within a second, so no request fails (but what the
    replica was handling when it died) and none waits long."""
    docker, compose = env["docker"], env["compose"]
    STATE["sessions"] = load_sessions(env["url"])
    victim = compose.container("gateway-2")
    load = Load(env["port"], STATE["sessions"], tag="dkill")
    try:
        time.sleep(5)
        t_kill = time.monotonic()
        docker.run("docker", "kill", victim)
        t_killed = time.monotonic()
        time.sleep(35)
        assert health(docker, victim) != "healthy", "it stayed dead"
    finally:
        reqs = load.stop()
    failed = report("fault 1, docker kill of gateway-2 (dead for 35 s)", reqs, t_kill)
    assert_only_in_flight_failed(failed, t_kill, t_killed)
    assert_fast(reqs)
    docker.run("docker", "start", victim)
    wait_for("gateway-2 healthy again", lambda: health(docker, victim) == "healthy", timeout=180)


def test_fault_sigkill_of_a_replica_process_from_the_host(env):
    """A crash: SIGKILL of the replica's process from the host. The restart
    policy brings it back and nginx sends to it again."""
    docker, compose = env["docker"], env["compose"]
    if "sessions" not in STATE:
        STATE["sessions"] = load_sessions(env["url"])
    victim = compose.container("gateway-3")
    inspect = lambda f: docker.run("docker", "inspect", "-f", f, victim).stdout.strip()  # noqa: E731
    restarts, pid = int(inspect("{{.RestartCount}}")), int(inspect("{{.State.Pid}}"))
    load = Load(env["port"], STATE["sessions"], tag="sigkill")
    try:
        time.sleep(5)
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        t_killed = time.monotonic()
        wait_for("the restart policy restarting gateway-3",
                 lambda: int(inspect("{{.RestartCount}}")) > restarts and inspect("{{.State.Running}}") == "true",
                 timeout=60, interval=0.05)
        t_back = time.monotonic()
        wait_for("gateway-3 healthy again", lambda: health(docker, victim) == "healthy", timeout=120)
        t_healthy = time.monotonic()
        time.sleep(10)
    finally:
        reqs = load.stop()
    after = [r for r in reqs if r.start > t_back and r.status == 200]
    served = {rid: s for rid, s in replicas_by_id(env, [r.rid for r in after]).items() if s == "gateway-3"}
    first = min((r.end for r in after if r.rid in served), default=None)
    failed = report("fault 2, SIGKILL of gateway-3's process", reqs, t_kill,
                    [("running again", t_back), ("healthy", t_healthy)]
                    + ([("first request served by it ended", first)] if first else []))
    assert_only_in_flight_failed(failed, t_kill, t_killed)
    assert_fast(reqs)
    assert served, "nginx sent nothing to the restarted replica"
    say(f"  {len(served)} of {len(after)} requests after the restart served by gateway-3")


def test_fault_redis_restart(env):
    """`docker-compose restart redis` under load: binding requests get 503
    with Retry-After while Redis is away, unpinned ones keep working; from
    1 s after Redis answers over the stack's network again nothing fails,
    on any replica. Then the same restart with no traffic during it, and the
    bindings from before are still there (AOF)."""
    assert STATE, "the seed flow ran first"
    if "sessions" not in STATE:
        STATE["sessions"] = load_sessions(env["url"])
    docker, compose = env["docker"], env["compose"]
    before = binding_keys(env)
    assert len(before) >= 3, before  # a session and its two files at least
    pinger = Pinger(docker, compose.container("redis"))
    net = NetPinger(docker, f"{PROJECT}_default")
    load = Load(env["port"], STATE["sessions"], tag="redis")
    try:
        time.sleep(5)
        t_restart = time.monotonic()
        compose("restart", "redis")
        t_restarted = time.monotonic()
        t_inside = wait_for("redis answering again", lambda: pinger.back_after(t_restart, t_restarted),
                            timeout=120, interval=0.1)
        # Redis is back when it answers over the network, as the replicas
        # reach it; a ping inside its container can say so earlier.
        t_ready = wait_for("redis answering over the network",
                           lambda: net.back_after(t_restart, t_restarted), timeout=120, interval=0.1)
        time.sleep(max(0.0, t_ready + 15 - time.monotonic()))
    finally:
        reqs = load.stop()
        net.stop()
    t_down = pinger.first_failure_after(t_restart)
    failed = report("fault 3, docker-compose restart redis, under load", reqs, t_ready,
                    [("restart began", t_restart), ("first failed ping", t_down or t_ready),
                     ("a ping inside Redis's container answered", t_inside)])
    late = [r for r in failed if r.start >= t_ready + 1]
    if failed:
        try:
            store_events(env, t_ready, [r.rid for r in late])
        except Exception as e:  # the logs explain a failure; they must not hide it
            say(f"  (the replicas' logs could not be read: {e})")
    unpinned = [r for r in failed if r.kind != "file"]
    assert not unpinned, f"unpinned requests failed during the Redis restart: {unpinned[:5]}"
    for r in failed:
        assert r.status == 503 and r.retry_after, f"a binding request failed without 503 + Retry-After: {r}"
    assert not late, f"{len(late)} requests failed from 1 s after Redis was back: {late[:5]}"
    # Every replica served binding requests after the restart.
    after = [r.rid for r in reqs if r.start >= t_ready + 1 and r.kind == "file"]
    by_replica = collections.Counter(replicas_by_id(env, after).values())
    say(f"  binding requests from 1 s after Redis was back, by replica: {dict(by_replica)}")
    assert set(by_replica) == {"gateway-1", "gateway-2", "gateway-3"}, by_replica

    # No traffic during the restart: the replicas' connections broke
    # unnoticed; the first requests after it must not fail either.
    pinger.stop()
    net = NetPinger(docker, f"{PROJECT}_default")
    try:
        t_restart = time.monotonic()
        compose("restart", "redis")
        t_restarted = time.monotonic()
        t_ready = wait_for("redis answering over the network",
                           lambda: net.back_after(t_restart, t_restarted), timeout=120, interval=0.1)
    finally:
        net.stop()
    time.sleep(max(0.0, t_ready + 1 - time.monotonic()))
    load = Load(env["port"], STATE["sessions"], tag="redis-idle")
    time.sleep(10)
    reqs = load.stop()
    failed = report("fault 3, docker-compose restart redis, no traffic during it", reqs, t_ready,
                    [("restart began", t_restart)])
    assert not failed, f"{len(failed)} requests failed from 1 s after Redis was back"

    after = binding_keys(env)
    assert before <= after, f"lost: {sorted(before - after)}"
    # The session still binds new uploads to its key, the files still go
    # to their owner.
    rid = f"after-redis-{uuid.uuid4().hex}"
    f = upload(client(env["url"], {"X-Session-Id": STATE["sid"], "x-request-id": rid}), b"later", "later")
    assert fake(env).file_owners()[f.name] == STATE["owner"]
    r = use_files(client(env["url"]), STATE["files"] + [f])
    assert "3 files" in r.text, r.text


def test_down_and_up_still_routes_earlier_files_to_their_owner(env):
    assert STATE, "the seed flow ran first"
    compose = env["compose"]
    before = binding_keys(env)
    compose("down", timeout=300)
    compose("up", "-d", "--no-build", timeout=300)
    wait_until_serving(env)
    assert before <= binding_keys(env), "the Redis volume outlived down + up"
    # The fake upstream is a new process without the files; what is checked
    # is where the gateway sends a request that references one: straight to
    # the key that owns it (a lost binding would show as discovery probes on
    # other keys first).
    up = fake(env)
    for f in STATE["files"]:
        up.reset()
        generate(env["url"], {"contents": [{"parts": [
            {"fileData": {"fileUri": f.uri, "mimeType": "text/plain"}}, {"text": "what is it?"}]}]})
        reqs = [r for r in up.requests() if not r["path"].endswith("/models")]
        assert len(reqs) == 1 and ":generateContent" in reqs[0]["path"], reqs
        assert reqs[0]["headers"]["x-goog-api-key"] == STATE["owner"]


def cluster_nodes(compose, service):
    """`cluster nodes` as seen by one node: {id: (ip, flags, master id, slots)}."""
    out = compose("exec", "-T", service, "redis-cli", "cluster", "nodes").stdout
    nodes = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 8:
            nodes[f[0]] = (f[1].split(":")[0], f[2].split(","), f[3], f[8:])
    return nodes


def test_fault_cluster_override_master_killed(env):
    """docker-compose.cluster.yml, run: the stack on a six-node Redis
    Cluster, the seed flow on it, then `docker kill` of the master that holds
    a session of the load. Binding requests fail at most until the replica
    is promoted plus 1 s, nothing fails after."""
    docker, base = env["docker"], env["compose"]
    base("stop", timeout=300)
    compose = Compose(docker, base.dir, base.env, project=f"{PROJECT}cl",
                      files=("docker-compose.yml", "docker-compose.cluster.yml"))
    ctx = dict(env, compose=compose)
    try:
        t0 = time.monotonic()
        compose("up", "-d", "--no-build", timeout=300)
        wait_for("the cluster formed", lambda: "cluster_state:ok" in compose(
            "exec", "-T", "redis", "redis-cli", "cluster", "info", check=False).stdout, timeout=120)
        wait_until_serving(ctx)
        say(f"cluster stack serving in {time.monotonic() - t0:.0f} s")
        seed = seed_flow(ctx)
        sessions = load_sessions(ctx["url"])
        nodes = cluster_nodes(compose, "redis")
        assert sum("master" in n[1] for n in nodes.values()) == 3 and len(nodes) == 6, nodes
        slot = int(compose("exec", "-T", "redis", "redis-cli", "cluster", "keyslot",
                           f"gb:session:{sessions[0][0]}").stdout.strip())

        def serves(slots):
            for s in slots:
                lo, _, hi = s.partition("-")
                if not s.startswith("[") and int(lo) <= slot <= int(hi or lo):
                    return True
            return False
        dead_id = next(i for i, n in nodes.items() if "master" in n[1] and serves(n[3]))
        heir = next(i for i, n in nodes.items() if n[2] == dead_id)
        ips = {}
        for service in ("redis", "redis-2", "redis-3", "redis-4", "redis-5", "redis-6"):
            cid = compose.container(service)
            ip = docker.run("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                            cid).stdout.strip()
            ips[ip] = service
        victim = ips[nodes[dead_id][0]]
        survivor = next(ips[n[0]] for i, n in nodes.items() if "master" in n[1] and i != dead_id)
        say(f"killing {victim} (master of slot {slot}, session {sessions[0][0][:8]}…); its replica is {ips[nodes[heir][0]]}")

        load = Load(ctx["port"], sessions, tag="cluster")
        try:
            time.sleep(5)
            t_kill = time.monotonic()
            docker.run("docker", "kill", compose.container(victim))
            t_promoted = wait_for("the replica promoted", lambda: "master" in cluster_nodes(compose, survivor)[heir][1],
                                  timeout=60, interval=0.1) and time.monotonic()
            time.sleep(15)
        finally:
            reqs = load.stop()
        failed = report(f"fault 4, cluster: docker kill of master {victim}", reqs, t_kill,
                        [("replica promoted", t_promoted)])
        late = [r for r in failed if r.start >= t_promoted + 1]
        assert not late, f"{len(late)} requests failed from 1 s after the failover: {late[:5]}"
        for r in failed:
            assert r.end >= t_kill, r
        assert not [r for r in failed if r.kind != "file"], "unpinned requests failed"
        # The seed's files are still used together after the failover.
        r = use_files(client(ctx["url"]), seed["files"])
        assert "2 files" in r.text, r.text
    finally:
        compose("down", "-v", "--remove-orphans", check=False, timeout=300)


def checkout_copy(dest):
    """The project's files as a user's checkout has them."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    for name in filter(None, out.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_the_readme_quick_start(env):
    """README's compose quick start, command for command, in a copy of the
    checkout. The environment supplies what this machine lacks: the local
    base images and Debian's Redis and nginx (no registry), the build
    network for crates.io, and a free port instead of 8080."""
    env["compose"]("down", "-v", timeout=300)
    checkout = pathlib.Path(tempfile.mkdtemp(prefix="gb-checkout-"))
    try:
        checkout_copy(checkout)
        compose = Compose(env["docker"], checkout, dict(env["compose"].env, GB_BUILD_NETWORK="host", **BASES))
        # cp .env.example .env
        shutil.copy(checkout / ".env.example", checkout / ".env")
        # echo GB_UPSTREAM_URL=http://fake-gemini:8000 >> .env
        with open(checkout / ".env", "a") as f:
            f.write("GB_UPSTREAM_URL=http://fake-gemini:8000\n")
        # docker-compose --profile demo up -d --build
        compose("up", "-d", "--build", timeout=1800)
        for service in ("gateway-1", "gateway-2", "gateway-3"):
            cid = compose.container(service)
            wait_for(f"{service} healthy", lambda: health(env["docker"], cid) == "healthy", timeout=180)
        # curl localhost:8080/v1beta/models -H "x-goog-api-key: change-me-client-token"
        status, body = wait_for(
            "the models list through nginx",
            lambda: (lambda r: r if r[0] == 200 else None)(
                http_get(env["url"] + "/v1beta/models", {"x-goog-api-key": "change-me-client-token"})),
            timeout=60)
        assert f"models/{MODEL}" in body, body
        readme = (ROOT / "README.md").read_text()
        for line in ("cp .env.example .env", "echo GB_UPSTREAM_URL=http://fake-gemini:8000 >> .env",
                     "docker-compose --profile demo up -d --build",
                     'curl localhost:8080/v1beta/models -H "x-goog-api-key: change-me-client-token"'):
            assert line in readme, f"the README's quick start still says: {line}"
    finally:
        shutil.rmtree(checkout, ignore_errors=True)
