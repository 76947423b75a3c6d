"""Operator surfaces checked with real clients: the admin page in headless
Chromium, /metrics with the Prometheus parser."""

import datetime
import hashlib
import json
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import KEYS, TOKEN, Stack

ADMIN = "e2e-admin-token-987654"


def key_id(key):
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@pytest.fixture
def admin_stack():
    s = Stack(replicas=2, extra_env={"GB_ADMIN_TOKEN": ADMIN})
    yield s
    s.stop()
    assert ADMIN not in s.logs()


@pytest.fixture
def browser():
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    profile = tempfile.mkdtemp(prefix="gb-chromium-")
    opts = Options()
    opts.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]:
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def state_of(browser, kid):
    return browser.find_element(By.CSS_SELECTOR, f"#key-{kid} td.state").text


def wait_for(browser, condition):
    """Form posts navigate; wait (bounded) until the new page shows it."""
    # Only "the new page is not there yet" is waited out; any other error
    # fails the test at once. Chromium reports an element read while the
    # page is being replaced either as stale or, in a race, as a node that
    # "does not belong to the document": both mean the same.
    def settled(b):
        try:
            return condition(b)
        except WebDriverException as e:
            if "does not belong to the document" in str(e):
                return False
            raise

    return WebDriverWait(
        browser, 15, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    ).until(settled)


def test_log_in_see_the_keys_and_disable_one(admin_stack, browser):
    url = admin_stack.urls[0]
    browser.get(f"{url}/admin")
    # A client token does not open the admin page.
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    wait_for(browser, lambda b: "not the admin token" in b.page_source)
    browser.find_element(By.ID, "token").send_keys(ADMIN)
    browser.find_element(By.ID, "login").click()
    table = wait_for(browser, lambda b: b.find_element(By.ID, "keys"))
    for k in KEYS:
        assert k not in browser.page_source, "a raw key on the page"
        assert state_of(browser, key_id(k)) == "healthy"
    assert "up" in browser.find_element(By.ID, "store").text
    target = key_id(KEYS[2])
    table.find_element(By.CSS_SELECTOR, f"#key-{target} button[name=disable]").click()
    assert wait_for(browser, lambda b: state_of(b, target) == "disabled")
    # Every replica sees it: the other replica's API says so too.
    req = urllib.request.Request(f"{admin_stack.urls[1]}/admin/api/keys",
                                 headers={"authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        rows = json.loads(resp.read())["keys"]
    assert next(r for r in rows if r["id"] == target)["state"] == "disabled"
    browser.find_element(By.CSS_SELECTOR, f"#key-{target} button[name=enable]").click()
    assert wait_for(browser, lambda b: state_of(b, target) == "healthy")


def test_metrics_parse_as_openmetrics(admin_stack):
    url = admin_stack.urls[0]
    for _ in range(3):
        req = urllib.request.Request(f"{url}/v1beta/models", headers={"x-goog-api-key": TOKEN})
        urllib.request.urlopen(req, timeout=10).read()
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
        assert resp.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "gb_requests" in families
    served = [s for s in families["gb_requests"].samples
              if s.labels.get("route") == "models" and s.labels.get("status") == "200"]
    assert served and served[0].value == 3
    assert "gb_upstream_latency_seconds" in families
    assert "gb_key_state" in families


TOKEN_B = "e2e-token-bravo-0123456789"
BODY_MARK = "private-e2e-prompt-5512"
ARTIFACTS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "out"


def call(url, path, token, body, openai=False):
    headers = {"content-type": "application/json"}
    headers.update({"authorization": f"Bearer {token}"} if openai else {"x-goog-api-key": token})
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception:  # a stream cut mid-way
        return None, b""


def admin_api(url, path):
    req = urllib.request.Request(url + path, headers={"authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def usage_stack():
    s = Stack(replicas=2, extra_env={"GB_ADMIN_TOKEN": ADMIN,
                                     "GB_AUTH_TOKENS": f"team-a={TOKEN},{TOKEN_B}"})
    yield s
    s.stop()
    logs = s.logs()
    for secret in KEYS + [TOKEN, TOKEN_B, ADMIN, BODY_MARK]:
        assert secret not in logs


def test_the_status_page_charts_usage_and_lists_errors(usage_stack, browser, tmp_path):
    a, b = usage_stack.urls
    gen = {"contents": [{"parts": [{"text": BODY_MARK}]}]}
    chat = {"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": BODY_MARK}]}
    # Mixed traffic over both replicas, both client tokens, three models.
    for _ in range(3):
        assert call(a, "/v1beta/models/gemini-2.0-flash:generateContent", TOKEN, gen)[0] == 200
    for _ in range(2):
        assert call(b, "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", TOKEN_B, gen)[0] == 200
        assert call(b, "/v1beta/openai/chat/completions", TOKEN, dict(chat, stream=True), openai=True)[0] == 200
    # A rate-limited key and a cut stream, for the errors table.
    usage_stack.fake.set_mode(KEYS[0], {"mode": "quota", "retryDelay": "9s"})
    for _ in range(len(KEYS)):
        assert call(a, "/v1beta/models/gemini-2.0-flash:generateContent", TOKEN_B, gen)[0] == 200
    for k in KEYS:
        usage_stack.fake.set_mode(k, {"mode": "break_stream"})
    call(b, "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", TOKEN, gen)

    # The replicas flush every few seconds: wait until both have.
    WebDriverWait(None, 60, poll_frequency=0.3).until(
        lambda _: len(admin_api(a, "/admin/api/errors")["errors"]) >= 2)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    # 3 + 2 + 2 answers, one per key with the first rate-limited once, one cut.
    WebDriverWait(None, 60, poll_frequency=0.3).until(
        lambda _: admin_api(a, f"/admin/api/usage?from={today}")["totals"]["requests"]
        == 7 + len(KEYS) + 1 + 1)
    expected = admin_api(a, f"/admin/api/usage?from={today}")

    browser.set_window_size(1400, 3000)
    browser.get(f"{a}/admin")
    browser.find_element(By.ID, "token").send_keys(ADMIN)
    browser.find_element(By.ID, "login").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "chart-tokens"))
    # Charts: bars for the hours with traffic, one color per model.
    for chart in ["chart-requests", "chart-tokens"]:
        bars = browser.find_elements(By.CSS_SELECTOR, f"#{chart} rect.bar")
        assert bars, f"no bars in {chart}"
    legend = browser.page_source
    for model in ["gemini-2.0-flash", "gemini-2.5-pro", "gemini-2.5-flash"]:
        assert model in legend
    # Today's usage per key and model, against the pool.
    key_rows = browser.find_elements(By.CSS_SELECTOR, "#usage-keys tr")
    assert len(key_rows) >= 4
    pool = browser.find_element(By.ID, "usage-pool").text
    assert str(expected["totals"]["total_tokens"]) in pool
    # Client tokens by label, or by id; never the token.
    tokens = browser.find_element(By.ID, "usage-tokens").text
    assert "team-a" in tokens
    assert key_id(TOKEN_B) in tokens
    # The recent errors: the 429 with Google's status and delay, the cut.
    errors = browser.find_element(By.ID, "errors").text
    assert "RESOURCE_EXHAUSTED" in errors and "9 s" in errors
    assert "stream_cut" in errors
    page = browser.page_source
    for secret in KEYS + [TOKEN, TOKEN_B, ADMIN, BODY_MARK]:
        assert secret not in page, "a secret on the page"
    shot = tmp_path / "admin-usage.png"
    assert browser.save_screenshot(str(shot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "admin-usage.png")
    # The date-range form is a plain GET: a range before the traffic is empty.
    browser.get(f"{a}/admin?from=2020-01-01&to=2020-01-02")
    assert browser.find_element(By.CSS_SELECTOR, "#range input[name=from]").get_attribute("value") == "2020-01-01"
    assert "team-a" not in browser.find_element(By.ID, "usage-tokens").text
