"""The openai Python SDK through three gateway replicas on one Redis."""

import collections

import openai
import pytest

from conftest import KEYS, TOKEN


def clients(stack, suffix):
    return [openai.OpenAI(base_url=f"{u}{suffix}", api_key=TOKEN, max_retries=0) for u in stack.urls]


@pytest.mark.parametrize("suffix", ["/v1beta/openai/", "/v1/"])
def test_chat_embeddings_and_models_spread_over_the_keys(stack, suffix):
    cs = clients(stack, suffix)
    for i in range(8):
        c = cs[i % 3]
        r = c.chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "Hello from the fake upstream."
    for i in range(4):
        stream = cs[i % 3].chat.completions.create(
            model="gemini-2.0-flash", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == "Hello part 1 part 2 "
    e = cs[0].embeddings.create(model="text-embedding-004", input=["a", "b"])
    assert len(e.data) == 2
    ids = [m.id for m in cs[1].models.list()]
    assert "models/gemini-2.0-flash" in ids
    served = stack.fake.served()
    assert set(served) == set(KEYS)
    # 14 calls over 4 keys by one shared rotation: 3 or 4 each.
    assert all(3 <= n <= 4 for n in served.values()), served
    for r in stack.fake.requests():
        assert TOKEN not in str(r), "the client's Bearer token reached the upstream"
        assert r["headers"]["authorization"].removeprefix("Bearer ") in KEYS
        assert r["path"].startswith("/v1beta/openai/")


def test_a_429_is_retried_on_another_key_and_all_cooling_is_a_429(stack):
    c = clients(stack, "/v1beta/openai/")[0]
    stack.fake.set_mode(KEYS[0], {"mode": "quota", "retryDelay": "30s"})
    for _ in range(6):
        r = c.chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
    for k in KEYS[1:]:
        stack.fake.set_mode(k, {"mode": "quota", "retryDelay": "30s"})
    with pytest.raises(openai.RateLimitError) as err:
        for _ in range(8):
            c.chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 429
    body = err.value.response.json()
    assert "error" in body
    assert err.value.response.headers.get("retry-after")
