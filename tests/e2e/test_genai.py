"""google-genai (Python) through three gateway replicas on one Redis."""

import io
import uuid

import pytest
from google import genai
from google.genai import types

from conftest import KEYS, TOKEN

MODEL = "gemini-2.0-flash"


def client(base_url, api_version=None, headers=None):
    opts = {"base_url": base_url}
    if api_version:
        opts["api_version"] = api_version
    if headers:
        opts["headers"] = headers
    return genai.Client(api_key=TOKEN, http_options=types.HttpOptions(**opts))


@pytest.mark.parametrize("api_version", [None, "v1beta"])
def test_model_calls_work_through_every_replica(stack, api_version):
    for url in stack.urls:
        c = client(url, api_version)
        r = c.models.generate_content(model=MODEL, contents="hello")
        assert "fake upstream" in r.text
        chunks = list(c.models.generate_content_stream(model=MODEL, contents="hello"))
        assert "".join(ch.text for ch in chunks) == "chunk 0 chunk 1 chunk 2 "
        assert c.models.count_tokens(model=MODEL, contents="hello").total_tokens > 0
        e = c.models.embed_content(model="text-embedding-004", contents="hello")
        assert e.embeddings[0].values == [0.1, 0.2, 0.3]
        names = [m.name for m in c.models.list()]
        assert f"models/{MODEL}" in names
    want = "/v1/" if api_version is None else "/v1beta/"
    paths = [r["path"] for r in stack.fake.requests()]
    assert paths and all(p.startswith(want) for p in paths), paths
    for r in stack.fake.requests():
        assert TOKEN not in str(r), "the client's token reached the upstream"
        assert r["headers"]["x-goog-api-key"] in KEYS


def upload(c, data, name):
    return c.files.upload(file=io.BytesIO(data), config=types.UploadFileConfig(mime_type="text/plain", display_name=name))


def use_both(c, f1, f2):
    return c.models.generate_content(
        model=MODEL,
        contents=[
            types.Part.from_uri(file_uri=f1.uri, mime_type=f1.mime_type),
            types.Part.from_uri(file_uri=f2.uri, mime_type=f2.mime_type),
            "Compare these two files.",
        ],
    )


@pytest.mark.parametrize("api_version", [None, "v1beta"])
def test_files_of_one_session_via_client_headers_work_together_on_another_replica(stack, api_version):
    sid = str(uuid.uuid4())
    hdr = {"X-Session-Id": sid}
    c1 = client(stack.urls[0], api_version, hdr)
    c2 = client(stack.urls[1], api_version, hdr)
    f1 = upload(c1, b"first file", "one")
    f2 = upload(c2, b"second file", "two")
    owners = stack.fake.file_owners()
    assert owners[f1.name] == owners[f2.name]
    c3 = client(stack.urls[2], api_version)
    r = use_both(c3, f1, f2)
    assert "2 files" in r.text
    logs = stack.logs()
    assert "session bound to a key" in logs and sid in logs
    assert "reusing the key bound to the session" in logs
    for r in stack.fake.requests():
        assert sid not in str(r), "the session id reached the upstream"


@pytest.mark.parametrize("api_version", [None, "v1beta"])
def test_files_of_one_session_via_the_session_base_url(stack, api_version):
    sid = str(uuid.uuid4())
    c1 = client(f"{stack.urls[0]}/session/{sid}", api_version)
    c2 = client(f"{stack.urls[1]}/session/{sid}", api_version)
    f1 = upload(c1, b"a", "a")
    f2 = upload(c2, b"b", "b")
    owners = stack.fake.file_owners()
    assert owners[f1.name] == owners[f2.name]
    c3 = client(stack.urls[2], api_version)
    r = use_both(c3, f1, f2)
    assert "2 files" in r.text
    # get / list / delete through yet another replica, routed to the owner key
    c = client(stack.urls[1], api_version)
    assert c.files.get(name=f1.name).name == f1.name
    listed = {f.name for f in c.files.list()}
    assert {f1.name, f2.name} <= listed
    c.files.delete(name=f2.name)
    assert f2.name not in stack.fake.file_owners()


def test_files_referenced_through_any_replica_go_to_their_owner(stack):
    cs = [client(u) for u in stack.urls]
    f = upload(cs[0], b"solo", "solo")
    for i in range(9):
        r = cs[i % 3].models.generate_content(
            model=MODEL,
            contents=[types.Part.from_uri(file_uri=f.uri, mime_type="text/plain"), "what is it?"],
        )
        assert "1 files" in r.text
