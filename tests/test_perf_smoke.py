"""The CPU benchmark runs end to end at tiny sizes (its own result checks included)."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


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


@pytest.mark.slow
@needs_bash
def test_bench_jax_gpu_smoke(tmp_path):
    """The JAX GPU benchmark at tiny sizes; on this CPU-only JAX the device is the CPU and the
    comparisons are jnp / lax and sortgrad's host path. Its JSON also feeds the GPU check's
    summary script (perf/gpu_check.sh), which otherwise only runs on a GPU machine."""
    out = tmp_path / "jax_gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "bench_jax_gpu.py"), "--smoke",
                           "--no-peers", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failed_checks"] == [] and result["errors"] == []
    assert "git_commit" in result["environment"] and result["environment"]["versions"]["jax"]
    impls = {r["impl"] for r in result["records"]}
    assert {"sortgrad", "jnp.sort", "jnp.argsort(stable)", "lax.top_k",
            "sortgrad host path (pure_callback)"} <= impls
    assert all(r["check"]["agree"] for r in result["records"] if r["impl"] == "sortgrad")
    assert {c["op"] for c in result["per_call"]} >= {"sort", "argsort", "soft_rank_l2"}
    assert any(t["met"] is not None for t in result["targets"])

    helpers = tmp_path / "helpers"
    subprocess.run(["bash", str(ROOT / "perf" / "gpu_check.sh"), "--helpers", str(helpers)],
                   check=True, timeout=60)
    work, gpu_out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    gpu_out.mkdir()
    (gpu_out / "bench_jax.json").write_text(out.read_text())
    (work / "status_bench_jax").write_text("0 12\n")
    summary = subprocess.run([sys.executable, str(helpers / "summary.py"), str(work),
                              str(gpu_out)], capture_output=True, text=True, timeout=60,
                             check=False)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "targets:" in summary.stdout and "4 bench_jax: PASS" in summary.stdout
    assert (gpu_out / "summary.txt").read_text().strip() == summary.stdout.strip()


@needs_bash
def test_gpu_check_script_parses(tmp_path):
    """perf/gpu_check.sh (the one prepared GPU command) is valid bash, and the Python helpers
    it writes compile."""
    script = ROOT / "perf" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    subprocess.run(["bash", str(script), "--helpers", str(tmp_path)], check=True, timeout=60)
    helpers = sorted(p.name for p in tmp_path.glob("*.py"))
    assert helpers == ["env_probe.py", "prewarm.py", "sanitize_work.py", "summary.py"]
    for name in helpers:
        compile((tmp_path / name).read_text(), name, "exec")


@pytest.mark.slow
def test_bench_sharding_smoke(tmp_path):
    """Eight host devices in the benchmark's own process: no gather in the sharded programs,
    every variant equal to the one-device run."""
    out = tmp_path / "sharding.json"
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "bench_sharding.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failed_checks"] == []
    by_variant = {(r["op"], r["variant"]): r for r in result["records"]}
    assert all(by_variant[(op, "sharded")]["gathers"] == 0 for op, _ in by_variant)
    assert any(by_variant[(op, "gathered")]["gathers"] > 0 for op, _ in by_variant)


@pytest.mark.slow
def test_bench_top_k_cpu_smoke(tmp_path):
    out = tmp_path / "topk.json"
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "bench_top_k_cpu.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["summary"]["failed_checks"] == 0
    assert result["records"] and all(r["agree"] for r in result["records"])
    assert {r["pass"] for r in result["records"]} == {"fwd", "fwd+bwd"}


@pytest.mark.slow
def test_bench_call_overhead_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "bench_call_overhead.py"),
                           "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = {r["op"]: r for r in json.loads(out.read_text())["records"]}
    assert {"x + 1", "callback floor", "sort", "soft_rank eps=1", "eager sort"} <= set(records)
    assert all(r["us"] > 0 for r in records.values())
    assert records["sort"]["comparison"] == "jnp.sort"
