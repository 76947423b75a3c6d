"""Client limits as the real SDKs meet them: google-genai raises its 429
error with the gateway's RetryInfo and message, and openai raises
RateLimitError; a labeled token gets its own entry's limits."""

import os
import tempfile

import openai
import pytest
from google import genai
from google.genai import errors, types

from conftest import Stack, TOKEN

LIMITS = """
[clients.default]
rpm = 2

[clients.team]
rpm = 1
models = ["gemini-2.0-flash*"]
"""
TEAM_TOKEN = "tok-team-0123456789"


@pytest.fixture
def limited():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "limits.toml")
        with open(path, "w") as f:
            f.write(LIMITS)
        s = Stack(replicas=2, extra_env={
            "GB_LIMITS_FILE": path,
            "GB_AUTH_TOKENS": f"{TOKEN},team={TEAM_TOKEN}",
        })
        yield s
        s.stop()


def genai_client(url, token):
    return genai.Client(api_key=token, http_options=types.HttpOptions(base_url=url))


def retry_delay(details):
    for d in details["error"]["details"]:
        if d["@type"].endswith("RetryInfo"):
            return d["retryDelay"]
    return None


def test_google_genai_raises_its_429_with_the_gateways_retry_info(limited):
    c = [genai_client(u, TOKEN) for u in limited.urls]
    for i in range(2):
        assert "fake upstream" in c[i].models.generate_content(model="gemini-2.0-flash", contents="hi").text
    with pytest.raises(errors.ClientError) as e:
        c[0].models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert e.value.code == 429
    assert e.value.status == "RESOURCE_EXHAUSTED"
    assert "2 requests per minute (rpm)" in e.value.message
    delay = retry_delay(e.value.details)
    assert delay and delay.endswith("s") and 1 <= int(delay[:-1]) <= 60
    quota = [d for d in e.value.details["error"]["details"] if d["@type"].endswith("QuotaFailure")]
    assert quota[0]["violations"][0]["quotaId"] == "ClientRequestsPerMinute"


def test_a_labeled_token_gets_its_entry_and_a_model_outside_it_is_forbidden(limited):
    c = genai_client(limited.urls[1], TEAM_TOKEN)
    with pytest.raises(errors.ClientError) as e:
        c.models.generate_content(model="gemini-2.5-pro", contents="hi")
    assert e.value.code == 403
    assert e.value.status == "PERMISSION_DENIED"
    assert "gemini-2.5-pro" in e.value.message
    assert "fake upstream" in c.models.generate_content(model="gemini-2.0-flash", contents="hi").text
    with pytest.raises(errors.ClientError) as e:
        c.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert "1 requests per minute (rpm)" in e.value.message
    calls = [r for r in limited.fake.requests() if ":generateContent" in r["path"]]
    assert len(calls) == 1, "refused requests never reached the upstream"


def test_openai_raises_rate_limit_error(limited):
    c = [openai.OpenAI(base_url=f"{u}/v1beta/openai/", api_key=TOKEN, max_retries=0) for u in limited.urls]
    for i in range(2):
        c[i].chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as e:
        c[1].chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "rate_limit_exceeded"
    assert "requests per minute" in e.value.message
    assert e.value.response.headers["retry-after"].isdigit()
