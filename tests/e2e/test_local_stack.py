"""The SDK flows through nginx in front of three replicas, as started by
scripts/local-stack (the docker-compose topology as local processes)."""

import io
import os
import pathlib
import subprocess
import tempfile
import uuid

import openai
import pytest
from google import genai
from google.genai import types

from conftest import BIN_DIR, KEYS, ROOT, TOKEN, Fake


@pytest.fixture
def local_stack():
    d = pathlib.Path(tempfile.mkdtemp(prefix="gb-stack-"))
    env = dict(os.environ, GB_BIN_DIR=str(BIN_DIR), STACK_KEYS=",".join(KEYS), STACK_TOKEN=TOKEN)
    script = ROOT / "scripts" / "local-stack"
    subprocess.run(["bash", str(script), "start", str(d)], env=env, check=True, timeout=120,
                   stdout=subprocess.DEVNULL)
    info = dict(line.split("=", 1) for line in (d / "stack.env").read_text().split())
    info["dir"] = d
    yield info
    subprocess.run(["bash", str(script), "stop", str(d)], env=env, check=False, timeout=60)
    logs = "".join(p.read_text() for p in d.glob("gateway-*.log"))
    for secret in KEYS + [TOKEN]:
        assert secret not in logs


def test_sdk_flows_through_nginx_land_on_every_replica(local_stack):
    lb = local_stack["LB_URL"]
    fake = Fake(local_stack["FAKE_URL"])
    sid = str(uuid.uuid4())
    with_header = genai.Client(api_key=TOKEN, http_options=types.HttpOptions(base_url=lb, headers={"X-Session-Id": sid}))
    by_path = genai.Client(api_key=TOKEN, http_options=types.HttpOptions(base_url=f"{lb}/session/{sid}"))
    plain = genai.Client(api_key=TOKEN, http_options=types.HttpOptions(base_url=lb, api_version="v1beta"))
    files = [
        with_header.files.upload(file=io.BytesIO(b"one"), config=types.UploadFileConfig(mime_type="text/plain")),
        by_path.files.upload(file=io.BytesIO(b"two"), config=types.UploadFileConfig(mime_type="text/plain")),
        with_header.files.upload(file=io.BytesIO(b"three"), config=types.UploadFileConfig(mime_type="text/plain")),
    ]
    owners = fake.file_owners()
    assert len({owners[f.name] for f in files}) == 1, "one session, one key, through any replica"
    for _ in range(3):
        r = plain.models.generate_content(
            model="gemini-2.0-flash",
            contents=[types.Part.from_uri(file_uri=f.uri, mime_type="text/plain") for f in files] + ["all three"],
        )
        assert "3 files" in r.text
        chunks = list(plain.models.generate_content_stream(model="gemini-2.0-flash", contents="hi"))
        assert "".join(c.text for c in chunks) == "chunk 0 chunk 1 chunk 2 "

    for base in (f"{lb}/v1beta/openai/", f"{lb}/v1/"):
        oc = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0)
        r = oc.chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
        text = "".join(ch.choices[0].delta.content or "" for ch in oc.chat.completions.create(
            model="gemini-2.0-flash", messages=[{"role": "user", "content": "hi"}], stream=True) if ch.choices)
        assert text == "Hello part 1 part 2 "
        assert len(oc.embeddings.create(model="text-embedding-004", input=["a"]).data) == 1
        assert oc.models.list().data

    d = local_stack["dir"]
    for i in range(1, int(local_stack["REPLICAS"]) + 1):
        log = (d / f"gateway-{i}.log").read_text()
        api_lines = [l for l in log.splitlines() if "served" in l and "path=/healthz" not in l]
        assert api_lines, f"replica {i} served no API request"


def test_a_live_session_through_nginx(local_stack):
    """The Live API's WebSocket upgrade passes nginx (deploy/nginx-proxy.conf
    forwards Upgrade and Connection for it), frames flow both ways."""
    import asyncio
    import json

    import websockets

    url = local_stack["LB_URL"].replace("http://", "ws://", 1) + \
        "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"

    async def session():
        async with websockets.connect(url, additional_headers={"x-goog-api-key": TOKEN},
                                      open_timeout=30) as ws:
            await ws.send(json.dumps({"setup": {"model": "models/gemini-live-2.5-flash"}}))
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert "setupComplete" in first, first
            answers = []
            for text in ("first turn", "second turn"):
                await ws.send(json.dumps({"clientContent": {
                    "turns": [{"role": "user", "parts": [{"text": text}]}], "turnComplete": True}}))
                answer = json.loads(await asyncio.wait_for(ws.recv(), 30))
                done = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert done["serverContent"]["turnComplete"] is True, done
                answers.append(answer["serverContent"]["modelTurn"]["parts"][0]["text"])
            return answers

    answers = asyncio.run(session())
    assert answers[0].endswith(": first turn") and answers[1].endswith(": second turn"), answers
