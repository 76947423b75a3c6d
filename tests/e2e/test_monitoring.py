"""Monitoring as shipped: the alert rules under promtool, then a real
Prometheus (Debian's) with those rules scraping gateway replicas. The "no
usable key" alert fires once every key is spent for a model and resolves when
the keys serve again; "key disabled by Google" and "layout refused" fire;
every query of the Grafana dashboard returns data; the series they read are
on /metrics."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from conftest import BIN_DIR, KEYS, ROOT, TOKEN, Fake, Proc, Redis, Stack, free_port

PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "alerts.yml"
RULE_TESTS = PROM_DIR / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gemini-balancer.json"

MODEL = "gemini-2.5-flash"
OTHER_MODEL = "gemini-2.0-flash"
SCRAPE_S = 1
EVAL_S = 1
NO_KEY_FOR_S = 60  # the rule's `for`, checked against alerts.yml below
# Google's RetryInfo delay in the fake's 429s: the keys stay cooling well past
# the moment the alert must fire, then lapse.
COOLDOWN_S = 80
# Room for a busy machine on top of `for` + one scrape + one evaluation.
SLACK_S = 10


def rules():
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def promtool(*args):
    tool = shutil.which("promtool")
    assert tool, "promtool (Debian's prometheus package) is installed by scripts/test"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_alert_rules_pass_promtool():
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules())} rules found" in check.stdout
    unit = promtool("test", "rules", str(RULE_TESTS))
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def test_every_rule_has_a_summary_a_runbook_line_and_tests_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Alerts\n", 1)[1].split("\n#", 1)[0]
    runbook = {m.group(1) for m in re.finditer(r"^- `(\w+)`", section, re.M)}
    names = [r["alert"] for r in rules()]
    assert runbook == set(names), "one runbook line per rule, no other"
    for r in rules():
        assert r["annotations"]["summary"].strip(), r["alert"]
        mine = [c for c in cases if c["alertname"] == r["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{r['alert']}: no unit test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{r['alert']}: no unit test where it stays quiet"


def dashboard_exprs():
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def get(url, headers=None, timeout=10):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def generate(base, model=MODEL, token=TOKEN):
    body = json.dumps({"contents": [{"parts": [{"text": "hello"}]}]}).encode()
    req = urllib.request.Request(
        f"{base}/v1beta/models/{model}:generateContent", data=body, method="POST",
        headers={"content-type": "application/json", "x-goog-api-key": token})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def until(what, check, deadline):
    """Polls `check` until it returns something truthy; fails at the deadline."""
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


class Prometheus:
    """Debian's prometheus on a free port, its own data directory, scraping
    `targets` every second and evaluating alerts.yml every second."""

    def __init__(self, targets, workdir):
        binary = shutil.which("prometheus")
        assert binary, "prometheus (Debian's package) is installed by scripts/test"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s",
                       "evaluation_interval": f"{EVAL_S}s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "gemini-balancer", "metrics_path": "/metrics",
                                "static_configs": [{"targets": targets}]}],
        }
        cfg = workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while get_or_none(self.url + "/-/ready") != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start:\n{self.log.read_text()}")
            time.sleep(0.2)

    def api(self, path, **params):
        status, body = get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert status == 200, body
        reply = json.loads(body)
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def alerts(self, name):
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def get_or_none(url):
    try:
        return get(url, timeout=2)[0]
    except OSError:
        return None


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """Two replicas under a Prometheus, with traffic behind them, then every
    key spent for MODEL: the replicas have learned it when this returns."""
    stack = Stack(replicas=2)
    prom = None
    try:
        targets = [u.split("://", 1)[1] for u in stack.urls]
        prom = Prometheus(targets, tmp_path_factory.mktemp("prometheus"))
        until("both replicas scraped",
              lambda: len([t for t in prom.api("targets")["activeTargets"] if t["health"] == "up"]) == 2,
              time.monotonic() + 30)
        # Traffic for every panel: answers and tokens on both replicas, and a
        # refused client (the gateway's own error).
        for base in stack.urls:
            for _ in range(3):
                assert generate(base) == 200
                assert generate(base, OTHER_MODEL) == 200
            assert generate(base, token="not-a-token") == 403
        # A healthy pool: the alert is neither pending nor firing.
        until("two evaluations over the traffic",
              lambda: prom.query("sum(gb_requests_total)"), time.monotonic() + 20)
        time.sleep(2 * (SCRAPE_S + EVAL_S))
        assert prom.alerts("GeminiBalancerNoUsableKey") == []
        # Google refuses every key for MODEL until COOLDOWN_S from now.
        for k in KEYS:
            stack.fake.set_mode(k, {"mode": "quota", "retryDelay": f"{COOLDOWN_S}s", "model": MODEL})
        until("the gateway answering 429 itself for the spent model",
              lambda: generate(stack.urls[0]) == 429, time.monotonic() + 30)
        spent = time.monotonic()
        assert generate(stack.urls[1]) == 429, "the other replica shares the key states"
        assert generate(stack.urls[1], OTHER_MODEL) == 200, "other models keep their keys"
        yield stack, prom, spent
    finally:
        if prom:
            prom.stop()
        stack.stop()
    logs = stack.logs()
    for secret in KEYS + [TOKEN]:
        assert secret not in logs, "a key or token was logged"


def test_every_dashboard_panel_query_returns_data(monitored):
    """Runs while the keys cool (the cooldown panel has data only then)."""
    stack, prom, _ = monitored
    token_id = hashlib.sha256(TOKEN.encode()).hexdigest()[:12]
    for base in stack.urls:
        text = get(base + "/metrics")[1]
        assert re.search(rf'^gb_client_tokens_total{{token_id="{token_id}",kind="total"}} [1-9]', text, re.M), text
        assert not any(secret in text for secret in KEYS + [TOKEN]), "metrics name ids, never keys or tokens"
    exprs = dashboard_exprs()
    assert exprs
    deadline = time.monotonic() + 20
    for expr in exprs:
        until(f"a series for {expr!r}", lambda: prom.query(expr), deadline)


def test_no_usable_key_alert_fires_within_its_for_and_resolves(monitored):
    stack, prom, spent = monitored
    rule = next(r for r in rules() if r["alert"] == "GeminiBalancerNoUsableKey")
    assert rule["for"] == f"{NO_KEY_FOR_S // 60}m"

    def firing():
        return [a for a in prom.alerts("GeminiBalancerNoUsableKey") if a["state"] == "firing"]

    fire_by = spent + NO_KEY_FOR_S + SCRAPE_S + EVAL_S + SLACK_S
    assert fire_by < spent + COOLDOWN_S, "the keys are still cooling when it must have fired"
    alerts = until("the alert firing", firing, fire_by)
    assert [a["labels"]["model"] for a in alerts] == [MODEL], "only the spent model, not `all`"
    assert alerts[0]["labels"]["severity"] == "critical"
    assert MODEL in alerts[0]["annotations"]["summary"]

    # Google serves again; once the cooldowns lapse the keys are usable and
    # the alert resolves.
    for k in KEYS:
        stack.fake.set_mode(k, {"mode": "normal"})
    until("the alert resolving", lambda: prom.alerts("GeminiBalancerNoUsableKey") == [],
          spent + COOLDOWN_S + 2 * (SCRAPE_S + EVAL_S) + SLACK_S)
    assert generate(stack.urls[0]) == 200
    assert generate(stack.urls[1]) == 200


def sample(base, name):
    """The value of an unlabelled metric on a replica's /metrics."""
    status, text = get(base + "/metrics")
    assert status == 200, text
    values = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} in:\n{text}"
    return values[0]


def test_live_sessions_and_open_files_are_on_metrics(stack):
    from websockets.sync.client import connect

    base = stack.urls[0]
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    assert sample(base, "gb_live_sessions") == 0
    with connect("ws" + base[len("http"):] + path, additional_headers={"x-goog-api-key": TOKEN}) as ws:
        ws.send(json.dumps({"setup": {"model": "models/gemini-live-2.5-flash"}}))
        assert "setupComplete" in ws.recv(timeout=10)
        assert sample(base, "gb_live_sessions") == 1
        assert sample(stack.urls[1], "gb_live_sessions") == 0, "each replica counts what it relays"
    until("the closed session no longer counted", lambda: sample(base, "gb_live_sessions") == 0,
          time.monotonic() + 10)
    open_fds, max_fds = sample(base, "gb_process_open_fds"), sample(base, "gb_process_max_fds")
    assert 0 < open_fds < max_fds


def redis_cmd(port, *args):
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload.encode())
        reply = s.recv(1024)
    assert not reply.startswith(b"-"), reply
    return reply


def test_key_disabled_and_layout_refused_alerts_fire_through_prometheus(tmp_path):
    """One replica under Prometheus: a key Google refuses, then a store whose
    layout another replica moved past this one's (found in the background:
    the migration lock was held when this replica started)."""
    redis = Redis()
    redis_cmd(redis.port, "SET", "gb:lock:migrate", "a-newer-replica", "PX", "120000")
    fake = Fake()
    env = {"PATH": os.environ.get("PATH", ""), "GB_LISTEN": "127.0.0.1:0", "GB_API_KEYS": ",".join(KEYS),
           "GB_AUTH_TOKENS": TOKEN, "GB_UPSTREAM_URL": fake.url, "GB_REDIS_URL": redis.url, "RUST_LOG": "info"}
    gw = prom = None
    try:
        gw = Proc([str(BIN_DIR / "gemini-balancer")], env, "stderr")
        target = gw.url.split("://", 1)[1]
        prom = Prometheus([target], tmp_path)
        until("the replica scraped", lambda: prom.query('up{job="gemini-balancer"} == 1'), time.monotonic() + 30)
        assert generate(gw.url) == 200
        time.sleep(2 * (SCRAPE_S + EVAL_S))
        for name in ("GeminiBalancerKeyDisabledByGoogle", "GeminiBalancerStoreLayoutRefused"):
            assert prom.alerts(name) == [], name

        fake.set_mode(KEYS[0], {"mode": "invalid"})
        for _ in KEYS:
            assert generate(gw.url) == 200, "the request moves on to a good key"
        kid = hashlib.sha256(KEYS[0].encode()).hexdigest()[:12]

        def disabled():
            return [a for a in prom.alerts("GeminiBalancerKeyDisabledByGoogle") if a["state"] == "firing"]

        alerts = until("the key-disabled alert", disabled, time.monotonic() + 30)
        assert [(a["labels"]["key_id"], a["labels"]["reason"]) for a in alerts] == [(kid, "api_key_invalid")]
        disabled_series = [line for line in get(gw.url + "/metrics")[1].splitlines()
                           if line.startswith("gb_key_disabled{")]
        assert disabled_series == [f'gb_key_disabled{{key_id="{kid}",reason="api_key_invalid"}} 1'], \
            "only the disabled key is listed"
        assert sample(gw.url, "gb_store_layout_refused") == 0

        redis_cmd(redis.port, "SET", "gb:layout", "3")
        redis_cmd(redis.port, "DEL", "gb:lock:migrate")

        def refused():
            return [a for a in prom.alerts("GeminiBalancerStoreLayoutRefused") if a["state"] == "firing"]

        alerts = until("the layout-refused alert", refused, time.monotonic() + 30)
        assert [a["labels"]["instance"] for a in alerts] == [target]
        assert sample(gw.url, "gb_store_layout_refused") == 1
    finally:
        if prom:
            prom.stop()
        if gw:
            gw.stop()
        fake.proc.stop()
        redis.stop()
    for secret in KEYS + [TOKEN]:
        assert secret not in "".join(gw.lines), "a key or token was logged"
