"""Sharded inputs on eight host devices: tests/multidevice, in a process of its own (JAX fixes
its device count when it starts; the rest of the suite keeps one device)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_multidevice_suite():
    env = dict(os.environ, SORTGRAD_MULTIDEVICE="1")
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-p", "no:randomly", str(ROOT / "tests" / "multidevice")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout.splitlines()[-1]
