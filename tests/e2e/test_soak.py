"""The soak test (bench/soak) in its short mode: mixed traffic through three
replicas while Redis restarts empty, one replica restarts, and one key's
upstream answers stall mid-body."""

import json
import subprocess
import sys
import tempfile

from conftest import ROOT


def test_short_soak_loses_nothing_and_misroutes_nothing():
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        run = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "15", "--workers", "3", "--out", out.name],
            capture_output=True, text=True, timeout=600,
        )
        report = json.loads(open(out.name).read())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert report["failed_outside_outage"] == 0, report["first_failures"]
    assert report["files_misrouted"] == 0, report["misrouted"]
    assert report["files_uploaded"] > 0
    outcomes = report["requests_by_outcome"]
    for op in ("generate", "stream", "upload_pair", "use_file"):
        assert outcomes.get(f"{op}:ok", 0) > 0, outcomes
    assert not report["secrets_in_logs"]
    assert report["sigterm_exit_code"] == 0, "the SIGTERM'd replica drained and exited 0"
    # Stalled upstream answers were cut by the idle timeout: some requests
    # met them, none outlived the timeouts, and the replicas' memory and
    # descriptors stayed bounded.
    assert sum(n for k, n in outcomes.items() if k.endswith(":cut_during_upstream_stall")) > 0, outcomes
    assert report["exchanges_over_bound"] == [], report["exchanges_over_bound"]
    assert report["longest_exchange_s"] <= report["exchange_bound_s"]
    assert len(report["replicas"]) == 3, report["replicas"]
    for replica in report["replicas"]:
        assert replica["samples"] > 0, replica
        assert replica["rss_kib"]["peak"] < 256 * 1024, replica
    assert report["fds_leaked"] == [], report["replicas"]
