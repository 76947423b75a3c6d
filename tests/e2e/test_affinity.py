"""Files that work together without client changes: uploads with no session
id share a key per client token (GB_UPLOAD_AFFINITY=token, the default),
through three replicas, with the real google-genai SDK."""

import io
import json
import re
import urllib.request

import pytest
from google import genai
from google.genai import errors, types

from conftest import KEYS, TOKEN, Stack

MODEL = "gemini-2.0-flash"
TOKEN_B = "e2e-token-bravo-0123456789"


def client(base_url, token=TOKEN, headers=None):
    opts = {"base_url": base_url}
    if headers:
        opts["headers"] = headers
    return genai.Client(api_key=token, http_options=types.HttpOptions(**opts))


def upload(c, data):
    return c.files.upload(file=io.BytesIO(data), config=types.UploadFileConfig(mime_type="text/plain"))


def use(c, files):
    parts = [types.Part.from_uri(file_uri=f.uri, mime_type=f.mime_type) for f in files]
    return c.models.generate_content(model=MODEL, contents=parts + ["Compare these files."])


def metric(url, name):
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{name} (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


@pytest.fixture
def two_tokens():
    s = Stack(extra_env={"GB_AUTH_TOKENS": f"{TOKEN},{TOKEN_B}"})
    yield s
    s.stop()
    logs = s.logs()
    for secret in KEYS + [TOKEN, TOKEN_B]:
        assert secret not in logs, "a key or token was logged"


def test_uploads_of_one_token_without_a_session_share_a_key_across_replicas(stack):
    # Four uploads over four keys would land on four keys by rotation.
    files = [upload(client(stack.urls[i % 3]), f"file {i}".encode()) for i in range(4)]
    owners = stack.fake.file_owners()
    assert len({owners[f.name] for f in files}) == 1, owners
    r = use(client(stack.urls[2]), files)
    assert "4 files" in r.text
    logs = stack.logs()
    assert re.search(r'session bound to a key.*source="?token', logs), logs
    assert TOKEN not in logs
    assert sum(metric(u, "gb_uploads_bound_by_token_total") for u in stack.urls) == 1


def test_uploads_of_two_tokens_are_free_to_land_on_different_keys(two_tokens):
    s = two_tokens
    a = [upload(client(s.urls[i % 3]), b"a") for i in range(2)]
    b = [upload(client(s.urls[(i + 1) % 3], TOKEN_B), b"b") for i in range(2)]
    owners = s.fake.file_owners()
    assert owners[a[0].name] == owners[a[1].name]
    assert owners[b[0].name] == owners[b[1].name]
    assert owners[a[0].name] != owners[b[0].name], "each token's binding is its own rotation pick"


def test_with_affinity_none_uploads_rotate():
    s = Stack(extra_env={"GB_UPLOAD_AFFINITY": "none"})
    try:
        files = [upload(client(s.urls[i % 3]), b"x") for i in range(4)]
        owners = s.fake.file_owners()
        assert len({owners[f.name] for f in files}) > 1, owners
        with pytest.raises(errors.ClientError) as e:
            use(client(s.urls[0]), files)
        assert e.value.code == 409
        assert "GB_UPLOAD_AFFINITY=none" in str(e.value)
    finally:
        s.stop()


def test_an_explicit_session_id_wins_over_the_token_binding(stack):
    implicit = upload(client(stack.urls[0]), b"implicit")
    owners = stack.fake.file_owners()
    token_key = owners[implicit.name]
    for n in range(len(KEYS) + 1):
        c = client(stack.urls[1], headers={"X-Session-Id": f"conversation-{n}"})
        f = upload(c, b"explicit")
        owner = stack.fake.file_owners()[f.name]
        if owner != token_key:
            break
    assert owner != token_key, "a named session is bound on its own, by rotation"
    again = upload(client(stack.urls[2]), b"implicit again")
    assert stack.fake.file_owners()[again.name] == token_key


def test_a_long_cooldown_moves_new_uploads_and_the_409_explains_why(stack):
    first = upload(client(stack.urls[0]), b"first")
    owners = stack.fake.file_owners()
    bound_key = owners[first.name]
    bound_id = bound_key
    stack.fake.set_mode(bound_key, {"mode": "quota", "retryDelay": "120s"})
    # A request pinned to that key by its file meets the 429: the key cools
    # for two minutes, longer than GB_PIN_WAIT.
    with pytest.raises(errors.ClientError) as e:
        use(client(stack.urls[1]), [first])
    assert e.value.code == 429
    second = upload(client(stack.urls[2]), b"second")
    owners = stack.fake.file_owners()
    assert owners[second.name] != bound_id, "new uploads moved off the cooling key"
    assert "session re-bound" in stack.logs()
    stack.fake.set_mode(bound_key, {"mode": "normal"})
    with pytest.raises(errors.ClientError) as e:
        use(client(stack.urls[0]), [first, second])
    assert e.value.code == 409
    message = str(e.value)
    assert "GB_UPLOAD_AFFINITY=token" in message and "cooldown" in message, message
    assert sum(metric(u, "gb_mixed_owner_conflicts_total") for u in stack.urls) == 1
