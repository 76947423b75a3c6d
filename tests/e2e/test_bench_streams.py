"""bench/streams.py, small: many concurrent SSE streams through one replica,
nginx `proxy_pass` and direct, every stream getting every event, with the
gateway reaching the fake over TLS (HTTP/2) and the descriptors it held
counted. Proves the benchmark runs and what its 10,000-stream section
reports is measured, not assumed."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import BIN_DIR, ROOT

STREAMS = 300


@pytest.mark.skipif(not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")), reason="nginx missing")
def test_streams_benchmark_holds_every_stream_to_the_end():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "streams.py"), "--streams", str(STREAMS), "--ramp", "1",
         "--events", "3", "--interval-ms", "1000", "--timeout", "30"],
        env=dict(os.environ, BENCH_BIN_DIR=str(BIN_DIR)), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["target"]: r for r in json.loads(out.stdout)["rows"]}
    assert set(rows) == {"direct to the fake", "nginx proxy_pass (2 workers)", "gateway, Redis"}, rows
    for name, r in rows.items():
        assert r["errors"] == 0 and r["complete"] == STREAMS, (name, r)
        assert r["first_event_p99_ms"] is not None, (name, r)
    gw = rows["gateway, Redis"]
    # Every stream is open at once (each lasts 2 s, all open within 1 s):
    # one socket per client stream; the upstream streams share a few
    # HTTP/2 connections (over HTTP/1.1 it would be two sockets per stream).
    assert STREAMS <= gw["peak_fds"] < 2 * STREAMS, gw
    assert gw["upstream_cpu_s"] is not None and gw["peak_rss_mib"] > gw["idle_rss_mib"], gw
