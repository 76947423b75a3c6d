#!/usr/bin/env python3
"""Upload memory benchmark: streams one large resumable upload through one
gateway replica (embedded store) to the fake upstream and records the
replica's idle and peak RSS (VmHWM). Usage: bench/upload-rss [size_mib]."""

import http.client
import json
import os
import pathlib
import platform
import sys
import time
import urllib.parse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import BIN, ROOT, start  # noqa: E402

TOKEN = "bench-token"
KEY = "AIzaBenchKey-abcdefghijklmnop"


def rss_kib(pid, field):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main():
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    size = size_mib * 1024 * 1024
    fake, fake_url = start([str(BIN / "fake-gemini")],
                           dict(os.environ, FAKE_KEYS=KEY, FAKE_RECORD="0"), "stdout")
    env = {"PATH": os.environ.get("PATH", ""), "GB_LISTEN": "127.0.0.1:0", "GB_API_KEYS": KEY,
           "GB_AUTH_TOKENS": TOKEN, "GB_UPSTREAM_URL": fake_url, "RUST_LOG": "warn,gemini_balancer::startup=info"}
    gw, gw_url = start([str(BIN / "gemini-balancer")], env, "stderr")
    try:
        time.sleep(0.5)
        idle = rss_kib(gw.pid, "VmRSS")
        host = urllib.parse.urlparse(gw_url)
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=600)
        meta = json.dumps({"file": {"display_name": "big", "mime_type": "application/octet-stream",
                                    "size_bytes": size}})
        conn.request("POST", "/upload/v1beta/files", body=meta, headers={
            "x-goog-api-key": TOKEN, "x-goog-upload-protocol": "resumable",
            "x-goog-upload-command": "start", "content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        upload_url = urllib.parse.urlparse(resp.getheader("x-goog-upload-url"))
        block = os.urandom(1024 * 1024)

        def body():
            for _ in range(size_mib):
                yield block

        started = time.monotonic()
        conn.request("POST", f"{upload_url.path}?{upload_url.query}", body=body(), headers={
            "x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0",
            "content-length": str(size)})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        elapsed = time.monotonic() - started
        assert resp.status == 200, answer
        assert answer["file"]["sizeBytes"] == str(size), answer
        peak = rss_kib(gw.pid, "VmHWM")
    finally:
        gw.kill()
        fake.kill()
    result = {
        "upload_mib": size_mib,
        "idle_rss_mib": round(idle / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "seconds": round(elapsed, 2),
        "throughput_mib_s": round(size_mib / elapsed, 1),
        "target_peak_rss_mib": 64,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.system()} {platform.release()}",
    }
    out = ROOT / "bench" / "results-upload.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
