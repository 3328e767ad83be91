"""The CPU benchmark runs end to end at tiny sizes (its own result checks included)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "bench_cpu.py"), "--smoke",
                           "--no-torch", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failed_checks"] == []
    assert {r["impl"] for r in result["records"]} >= {"sortgrad", "jnp.sort"}


@pytest.mark.slow
def test_bench_perturbed_smoke(tmp_path):
    out = tmp_path / "perturbed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "bench_perturbed.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failed_checks"] == []
    assert {c["impl"] for c in result["checks"]} >= {"sortgrad", "naive-loop", "lax.map"}
    assert all(c["forward_equal"] for c in result["checks"])
