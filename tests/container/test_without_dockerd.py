"""Where no dockerd can start, the container-stack test skips, and says so."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_without_dockerd_the_stack_test_skips_loudly():
    # Only the venv's own tools on PATH: no dockerd, docker, debootstrap.
    # Run as scripts/test runs it (-s: output not captured).
    env = dict(os.environ, PATH=str(pathlib.Path(sys.executable).parent))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-rs", "-p", "no:cacheprovider",
         str(HERE / "test_compose_stack.py")],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SKIP container stack:" in out.stderr, out.stderr
    assert " skipped" in out.stdout and "passed" not in out.stdout and "failed" not in out.stdout, out.stdout
