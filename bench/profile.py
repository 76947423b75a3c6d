#!/usr/bin/env python3
"""The body of bench/profile: gateway + Redis + fake, wrk load, perf samples."""

import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import BIN, KEYS, ROOT, TOKEN, free_port, start  # noqa: E402

GENERATE = "/v1beta/models/gemini-2.0-flash:generateContent"
BODY = '{"contents":[{"parts":[{"text":"hello"}]}]}'
TOOLS = ROOT / "bench" / ".tools" / "bin"


def main():
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    procs = []
    work = tempfile.mkdtemp(prefix="gb-profile-")
    try:
        fake, fake_url = start([str(BIN / "fake-gemini")],
                               dict(os.environ, FAKE_KEYS=",".join(KEYS), FAKE_RECORD="0"), "stdout")
        procs.append(fake)
        redis_port = free_port()
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
        time.sleep(0.5)
        env = {"PATH": os.environ.get("PATH", ""), "GB_LISTEN": "127.0.0.1:0", "GB_API_KEYS": ",".join(KEYS),
               "GB_AUTH_TOKENS": TOKEN, "GB_UPSTREAM_URL": fake_url,
               "GB_REDIS_URL": f"redis://127.0.0.1:{redis_port}", "RUST_LOG": "warn,gemini_balancer::startup=info"}
        gw, gw_url = start([str(BIN / "gemini-balancer")], env, "stderr")
        procs.append(gw)
        data = f"{work}/perf.data"
        load = subprocess.Popen(["wrk", "-t1", "-c64", "-d", f"{seconds + 2}s", "-s",
                                 str(ROOT / "bench" / "wrk.lua"), "-H", f"x-goog-api-key: {TOKEN}",
                                 gw_url + GENERATE], env=dict(os.environ, WRK_BODY=BODY),
                                stdout=subprocess.DEVNULL)
        time.sleep(1)
        subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", "997", "-g", "--call-graph", "dwarf,16384",
                        "-p", str(gw.pid), "-o", data, "--", "sleep", str(seconds)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        load.wait()
        script = subprocess.run(["perf", "script", "-i", data], check=True, capture_output=True).stdout
        folded = subprocess.run([str(TOOLS / "inferno-collapse-perf")], input=script, check=True,
                                capture_output=True).stdout
        (ROOT / "bench" / "profile.folded").write_bytes(folded)
        svg = subprocess.run([str(TOOLS / "inferno-flamegraph"), "--title",
                              "gemini-balancer under saturation (Redis store, 0 ms upstream)"],
                             input=folded, check=True, capture_output=True).stdout
        (ROOT / "bench" / "flamegraph.svg").write_bytes(svg)
        print("wrote bench/profile.folded and bench/flamegraph.svg")
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
