"""Operator surfaces checked with real clients: the admin page in headless
Chromium, /metrics with the Prometheus parser."""

import hashlib
import json
import pathlib
import shutil
import tempfile
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
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
    # fails the test at once.
    return WebDriverWait(
        browser, 15, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    ).until(lambda b: condition(b))


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
