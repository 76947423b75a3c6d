"""google-genai (Python): context caches, batches and file search stores
through three gateway replicas on one Redis, each on the key that owns it."""

import io
import time

from google import genai
from google.genai import types

from conftest import TOKEN

MODEL = "gemini-2.0-flash"


def client(base_url, headers=None):
    opts = {"base_url": base_url}
    if headers:
        opts["headers"] = headers
    return genai.Client(api_key=TOKEN, http_options=types.HttpOptions(**opts))


def upload(c, data, name):
    return c.files.upload(file=io.BytesIO(data), config=types.UploadFileConfig(mime_type="text/plain", display_name=name))


def served_on(stack, key):
    return stack.fake.served().get(key, 0)


def test_a_cache_from_an_uploaded_file_answers_on_its_owner_through_every_replica(stack):
    cs = [client(u) for u in stack.urls]
    f = upload(cs[0], b"a long manual", "manual")
    cache = cs[1].caches.create(
        model=MODEL,
        config=types.CreateCachedContentConfig(
            contents=[types.Content(role="user", parts=[types.Part.from_uri(file_uri=f.uri, mime_type="text/plain")])],
            ttl="600s",
        ),
    )
    owner = stack.fake.resource_owners()[cache.name]
    assert owner == stack.fake.file_owners()[f.name], "the cache was made on the file's key"
    before = served_on(stack, owner)
    for i in range(3):
        r = cs[(i + 2) % 3].models.generate_content(
            model=MODEL,
            contents=f"question {i}",
            config=types.GenerateContentConfig(cached_content=cache.name),
        )
        assert "fake upstream" in r.text
    assert served_on(stack, owner) - before == 3, "every question on the owner key"
    # A fourth path: a session base URL that would pin another key.
    fourth = client(f"{stack.urls[2]}/session/another-session")
    assert fourth.caches.get(name=cache.name).name == cache.name
    fourth.caches.delete(name=cache.name)
    assert cache.name not in stack.fake.resource_owners()
    keys = {r["key"] for r in stack.fake.requests() if cache.name in r["path"]}
    assert keys == {owner}, keys


def test_an_inline_batch_is_polled_through_other_replicas_until_done(stack):
    cs = [client(u) for u in stack.urls]
    job = cs[0].batches.create(
        model=MODEL,
        src=[{"contents": [{"parts": [{"text": f"q{i}"}], "role": "user"}]} for i in range(2)],
    )
    owner = stack.fake.resource_owners()[job.name]
    deadline = time.monotonic() + 60
    i = 1
    while job.state != types.JobState.JOB_STATE_SUCCEEDED:
        assert time.monotonic() < deadline, job.state
        job = cs[i % 3].batches.get(name=job.name)
        i += 1
    answers = [r.response.text for r in job.dest.inlined_responses]
    assert answers == ["Batch answer 0 from the fake upstream.", "Batch answer 1 from the fake upstream."]
    keys = {r["key"] for r in stack.fake.requests() if job.name in r["path"]}
    assert keys == {owner}, keys


def test_a_file_search_store_with_a_document_answers_through_the_file_search_tool(stack):
    session = {"x-session-id": "file-search-work"}
    cs = [client(u, headers=session) for u in stack.urls]
    f = upload(cs[0], b"the warranty lasts two years", "warranty")
    store = cs[1].file_search_stores.create(config={"display_name": "docs"})
    owner = stack.fake.resource_owners()[store.name]
    op = cs[2].file_search_stores.import_file(file_search_store_name=store.name, file_name=f.name)
    deadline = time.monotonic() + 60
    while not op.done:
        assert time.monotonic() < deadline
        op = cs[0].operations.get(op)
    assert op.response.document_name.startswith(store.name + "/documents/")
    up = cs[1].file_search_stores.upload_to_file_search_store(
        file=io.BytesIO(b"returns within thirty days"), file_search_store_name=store.name,
        config={"mime_type": "text/plain", "display_name": "returns"})
    while not up.done:
        assert time.monotonic() < deadline
        up = cs[2].operations.get(up)
    assert up.response.document_name.startswith(store.name + "/documents/")
    docs = list(cs[0].file_search_stores.documents.list(parent=store.name))
    assert len(docs) == 2, docs
    plain = [client(u) for u in stack.urls]
    before = served_on(stack, owner)
    for i in range(3):
        r = plain[i].models.generate_content(
            model=MODEL,
            contents="how long is the warranty?",
            config=types.GenerateContentConfig(
                tools=[types.Tool(file_search=types.FileSearch(file_search_store_names=[store.name]))]
            ),
        )
        assert "fake upstream" in r.text
    assert served_on(stack, owner) - before == 3
    assert store.name in [s.name for s in plain[2].file_search_stores.list()]
