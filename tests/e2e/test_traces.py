"""Traces: the gateway's spans reach a real OTLP/HTTP receiver (protobuf,
decoded with opentelemetry-proto) — a retried request with its attempt and
store children, a client's traceparent continued, a Live session — with no
key, client token, session id or body in any attribute; and without
GB_OTLP_ENDPOINT nothing is sent."""

import asyncio
import http.server
import json
import os
import secrets
import signal
import ssl
import threading
import time
import urllib.request

from google import genai
from google.genai import types
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from conftest import KEYS, TOKEN, Stack, free_port
from test_live import make_pki, one_turn

MODEL = "gemini-2.0-flash"
BODY_MARK = "trace-body-mark-7c1f"
SESSION = "trace-session-4b2d9e"


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it is sent, decoded."""

    def __init__(self):
        self.spans = []
        self.posts = 0
        self.paths = set()
        lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                with lock:
                    receiver.posts += 1
                    receiver.paths.add((self.path, self.headers.get("content-type")))
                    for rs in request.resource_spans:
                        resource = attrs(rs.resource.attributes)
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                receiver.spans.append({
                                    "name": s.name,
                                    "trace_id": s.trace_id.hex(),
                                    "span_id": s.span_id.hex(),
                                    "parent": s.parent_span_id.hex(),
                                    "attrs": attrs(s.attributes),
                                    "resource": resource,
                                })
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, pick, what, deadline_s=30):
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            found = pick(list(self.spans))
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no {what} arrived; spans: {json.dumps(self.spans)[:3000]}")

    def stop(self):
        self.server.shutdown()


def attrs(kvs):
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


def descendants(spans, root):
    by_parent = {}
    for s in spans:
        by_parent.setdefault(s["parent"], []).append(s)
    out, todo = [], [root["span_id"]]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child["span_id"])
    return out


def generate(url, ctx, headers=None, session=None):
    path = f"/v1beta/models/{MODEL}:generateContent"
    if session:
        path = f"/session/{session}" + path
    body = json.dumps({"contents": [{"parts": [{"text": BODY_MARK}]}]}).encode()
    req = urllib.request.Request(url + path, data=body, method="POST", headers={
        "content-type": "application/json", "x-goog-api-key": TOKEN, **(headers or {})})
    with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
        resp.read()
        return resp.status, resp.headers["x-request-id"]


def request_span(spans, request_id):
    return next((s for s in spans if s["name"] == "request"
                 and s["attrs"].get("request_id") == request_id), None)


def test_spans_reach_an_otlp_receiver_with_their_children_and_the_clients_trace(tmp_path, monkeypatch):
    receiver = Receiver()
    pki = make_pki(tmp_path)
    stack = Stack(replicas=2, extra_env={
        "GB_OTLP_ENDPOINT": receiver.url, "GB_TLS_CERT": pki["cert.pem"], "GB_TLS_KEY": pki["key.pem"]})
    ctx = ssl.create_default_context(cafile=pki["ca.pem"])
    try:
        # A retried request: the first key answers 429 and the next 200.
        # Rotation starts each request on the next key, so one of the first
        # four starts on the limited key (which then cools and is skipped).
        stack.fake.set_mode(KEYS[0], {"mode": "quota", "retryDelay": "60s"})
        ids = [generate(stack.urls[i % 2], ctx)[1] for i in range(4)]

        def retried(spans):
            for rid in ids:
                root = request_span(spans, rid)
                if root and root["attrs"].get("attempts") == 2:
                    below = descendants(spans, root)
                    tries = sorted((s for s in below if s["name"] == "attempt"),
                                   key=lambda s: s["attrs"]["attempt"])
                    if len(tries) == 2 and any(s["name"] == "store" for s in below):
                        return root, tries, below
            return None

        root, tries, below = receiver.wait_for(retried, "retried request with its children")
        a = root["attrs"]
        assert a["route"] == "generate" and a["model"] == MODEL and a["status"] == 200, a
        assert a["outcome"] == "success" and a["token_id"] and a["replica"], a
        assert [t["attrs"]["attempt"] for t in tries] == [1, 2]
        assert tries[0]["attrs"]["status"] == 429 and tries[1]["attrs"]["status"] == 200, tries
        assert tries[0]["attrs"]["outcome"] == "rate_limited", tries
        assert tries[1]["attrs"]["outcome"] == "answer", tries
        assert tries[0]["attrs"]["key_id"] != tries[1]["attrs"]["key_id"]
        assert a["key_id"] == tries[1]["attrs"]["key_id"]
        assert all(t["parent"] == root["span_id"] for t in tries), (root, tries)
        ops = {s["attrs"]["op"] for s in below if s["name"] == "store"}
        assert "rotate" in ops, ops
        assert root["resource"].get("service.name") == "gemini-balancer", root["resource"]
        assert receiver.paths == {("/v1/traces", "application/x-protobuf")}, receiver.paths

        # A client's traceparent: the request joins the client's trace, as
        # a child of the client's span.
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        _, rid = generate(stack.urls[1], ctx, {"traceparent": f"00-{trace_id}-{parent_id}-01"},
                          session=SESSION)
        joined = receiver.wait_for(lambda spans: request_span(spans, rid), "continued request")
        assert joined["trace_id"] == trace_id and joined["parent"] == parent_id, joined
        assert SESSION not in joined["attrs"]["path"] and joined["attrs"]["path"].startswith("/session/-/")
        assert joined["attrs"]["chosen_by"] == "session", joined["attrs"]

        # A client that decided not to sample is followed too; probes and
        # scrapes are never traced. (Checked once the Live session's span,
        # ended later on the same replica, has arrived.)
        _, declined = generate(stack.urls[0], ctx,
                               {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"})
        for path in ("/healthz", "/readyz", "/metrics"):
            with urllib.request.urlopen(stack.urls[0] + path, timeout=10, context=ctx) as resp:
                resp.read()

        # A Live session is one span of its own, with its handshake attempt.
        monkeypatch.setenv("SSL_CERT_FILE", pki["ca.pem"])
        client = genai.Client(api_key=TOKEN, http_options=types.HttpOptions(base_url=stack.urls[0]))
        assert asyncio.run(one_turn(client, "hello traced live")).endswith(": hello traced live")

        def live(spans):
            for s in spans:
                if s["name"] == "live_session" and s["attrs"].get("route") == "live":
                    tries = [c for c in descendants(spans, s) if c["name"] == "attempt"]
                    if tries:
                        return s, tries
            return None

        session_span, live_tries = receiver.wait_for(live, "Live session span")
        assert session_span["attrs"]["key_id"] == live_tries[-1]["attrs"]["key_id"]
        assert session_span["attrs"]["model"].endswith("gemini-live-2.5-flash"), session_span["attrs"]
        assert live_tries[-1]["attrs"]["outcome"] == "answer"
        assert request_span(receiver.spans, declined) is None
        paths = {s["attrs"].get("path") for s in receiver.spans}
        assert not paths & {"/healthz", "/readyz", "/metrics"}, paths
    finally:
        stack.stop()
        receiver.stop()
    # Nothing secret in any attribute of any span.
    dumped = json.dumps(receiver.spans)
    for secret in KEYS + [TOKEN, BODY_MARK, SESSION, "hello traced live"]:
        assert secret not in dumped, secret
    # Background work (usage batches every few milliseconds, renewals, the
    # request log) makes no traces of its own: no store span is a root.
    roots = [s for s in receiver.spans if s["name"] == "store" and not s["parent"]]
    assert roots == [], roots[:5]


def test_a_collector_that_cannot_be_reached_is_logged():
    closed = free_port()
    stack = Stack(replicas=1, extra_env={"GB_OTLP_ENDPOINT": f"http://127.0.0.1:{closed}"})
    try:
        assert generate(stack.urls[0], None)[0] == 200
        deadline = time.monotonic() + 30
        while "traces could not be sent to the collector" not in stack.logs():
            assert time.monotonic() < deadline, stack.logs()[-2000:]
            time.sleep(0.2)
        # Requests are served all the same.
        assert generate(stack.urls[0], None)[0] == 200
    finally:
        stack.stop()


def test_without_an_endpoint_nothing_is_exported_and_sampling_follows_the_client(tmp_path):
    receiver = Receiver()
    # The OpenTelemetry SDK's own variable names the receiver: the gateway
    # must still send nothing while GB_OTLP_ENDPOINT is unset.
    quiet = Stack(replicas=1, extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    sampled_out = Stack(replicas=1, extra_env={"GB_OTLP_ENDPOINT": receiver.url, "GB_OTLP_SAMPLE": "0"})
    try:
        for _ in range(3):
            assert generate(quiet.urls[0], None)[0] == 200
        _, unsampled = generate(sampled_out.urls[0], None)
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        _, followed = generate(sampled_out.urls[0], None,
                               {"traceparent": f"00-{trace_id}-{parent_id}-01"})
        # With a ratio of 0 a new trace is not kept, but a client's sampled
        # trace is continued.
        joined = receiver.wait_for(lambda spans: request_span(spans, followed), "client-sampled request")
        assert joined["trace_id"] == trace_id
        # A replica stopping sends what it holds: both stop, and then the
        # receiver has all there will be.
        for stack in (quiet, sampled_out):
            stack.gateways[0].proc.send_signal(signal.SIGTERM)
            assert stack.gateways[0].proc.wait(timeout=60) == 0
        assert request_span(receiver.spans, unsampled) is None
        assert all(s["trace_id"] == trace_id for s in receiver.spans), receiver.spans
    finally:
        quiet.stop()
        sampled_out.stop()
        receiver.stop()
