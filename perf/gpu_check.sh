#!/usr/bin/env bash
# sortgrad GPU check: the ONE prepared command for a GPU machine (one H100/H200), no installs,
# done in under 8 minutes (DEADLINE_S, default 440 s, bounds every phase; each has a hard
# `timeout`; the kill grace periods add at most ~25 s). Run from the repository root:
#     bash perf/gpu_check.sh              (device tool: timeout_s=480)
# Needs the machine's python3 with jax (CUDA), cupy, numba + numba-cuda, pytest; uses
# pytest-timeout and compute-sanitizer when present. Nothing is installed or downloaded.
#
# Phases (one failing phase never stops the next; elapsed seconds printed for each):
#   1. env probe: versions, device limits, tools; collects the gpu-marked tests  -> env.json
#   2. prewarm: NVRTC-compiles every CuPy module into CuPy's disk cache (one process per
#      package, in parallel) and the CPU Numba reference kernels into Numba's cache, so that
#      the test processes of phase 3 load instead of compiling the same code many times
#   3. concurrently: the gpu-marked tests (pytest -m gpu), one process per
#      tests/kernels/test_<op>_backends.py file and backend family (cupy | numba |
#      numba-lowered: they compile different kernels; a family of many tests is split by
#      float / non-float dtypes), one for the other kernel tests, one per tests/bindings file
#      with gpu-marked tests (SG_BINDINGS_ALL=1: every bindings test, JAX on the GPU, one
#      process with pytest-xdist -n 4 where present); compute-sanitizer
#      memcheck / racecheck / synccheck on tiny calls of every CuPy kernel path through the
#      public kernel API (and racecheck on the Numba ones)          -> tests.log, sanitizer.log
#   4. benchmarks alone on the GPU: perf/bench_jax_gpu.py --backend both (budgeted), a
#      full-size subset of perf/bench_gpu_cupy.py, perf/bench_gpu_numba.py --smoke
#                                       -> bench_jax.json, bench_cupy.json, bench_numba.json,
#                                          bench.log (their output and the prewarm report)
#   5. summary, printed last                                                  -> summary.txt
# That is 8 files in $OUT (the device tool brings back at most 8), each kept small.
#
# Locally (no GPU) `bash perf/gpu_check.sh --helpers DIR` only writes the helper scripts into
# DIR (the test suite runs them on the CPU / Numba's simulator).
set -u
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-440}
PY=${PY:-python3}
W=${SG_WORK:-/tmp/sgcheck}

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(elapsed)s] $*"; }
left() { echo $(( DEADLINE_S - $(elapsed) )); }

write_helpers() {  # DIR
local H=$1
mkdir -p "$H"

cat > "$H/env_probe.py" <<'PYEOF'
"""Versions, device limits and tools of this machine as JSON (argv[1]: output path)."""
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import time

def version(name):
    try:
        return md.version(name)
    except Exception:
        return None

def run(*cmd, timeout=20):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        return (p.stdout + p.stderr).strip()[-3000:]
    except Exception as err:
        return f"unavailable: {err!r}"

info = {"python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
info["versions"] = {n: version(n) for n in (
    "numpy", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
    "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda", "llvmlite", "cuda-bindings",
    "cuda-core", "nvidia-cuda-nvrtc", "torch", "torchsort", "ott-jax", "softjax", "pytest",
    "pytest-timeout", "pytest-xdist", "hypothesis", "scipy", "ml-dtypes")}
info["tools"] = {t: shutil.which(t) for t in ("nvidia-smi", "nvcc", "compute-sanitizer", "ncu",
                                              "cuobjdump", "g++", "git", "timeout")}
info["nvidia_smi"] = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                         "memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,"
                         "compute_mode", "--format=csv")
info["nvcc"] = run("nvcc", "--version") if info["tools"]["nvcc"] else None
try:
    import cupy
    d = cupy.cuda.Device()
    a = d.attributes
    p = cupy.cuda.runtime.getDeviceProperties(d.id)
    info["cupy"] = {"device": p["name"].decode() if isinstance(p["name"], bytes) else p["name"],
                    "cc": f"{p['major']}.{p['minor']}", "sm_count": a["MultiProcessorCount"],
                    "l2_bytes": a.get("L2CacheSize"),
                    "max_shared_per_block": a["MaxSharedMemoryPerBlock"],
                    "max_shared_per_block_optin": a.get("MaxSharedMemoryPerBlockOptin"),
                    "total_mem": d.mem_info[1],
                    "driver": cupy.cuda.runtime.driverGetVersion(),
                    "runtime": cupy.cuda.runtime.runtimeGetVersion()}
    try:
        info["cupy"]["nvrtc"] = list(cupy.cuda.nvrtc.getVersion())
    except Exception as err:
        info["cupy"]["nvrtc"] = repr(err)
except Exception as err:
    info["cupy_error"] = repr(err)[:500]
try:
    from numba import cuda
    info["numba_cuda"] = {"available": bool(cuda.is_available()),
                          "module": getattr(cuda, "__file__", None)}
    if info["numba_cuda"]["available"]:
        info["numba_cuda"]["cc"] = list(cuda.get_current_device().compute_capability)
except Exception as err:
    info["numba_error"] = repr(err)[:500]
try:
    import jax
    info["jax"] = {"version": jax.__version__, "backend": jax.default_backend(),
                   "devices": [str(d) for d in jax.devices()],
                   "device_kind": jax.devices()[0].device_kind}
except Exception as err:
    info["jax_error"] = repr(err)[:500]
try:
    t = time.time()
    import sortgrad
    info["sortgrad"] = {"import_s": round(time.time() - t, 2), "file": sortgrad.__file__,
                        "set_gpu_backend": hasattr(sortgrad, "set_gpu_backend"),
                        "callback_mode": sortgrad.get_callback_mode()}
except Exception as err:
    info["sortgrad_error"] = repr(err)[:500]
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1, default=str)
print(json.dumps({k: info.get(k) for k in ("cupy", "jax", "sortgrad")}, default=str))
PYEOF

cat > "$H/prewarm.py" <<'PYEOF'
"""argv[1] = "cpu:<op>" (segmented_sort, top_k, permutation, isotonic, soft): compiles (Numba
cache=True) the CPU kernels of that family that the tests use as references;
argv[1] = an op package (segmented_sort, top_k, ...): NVRTC-compiles its CuPy modules into
CuPy's disk cache and prints each kernel's registers / shared / local bytes."""
import importlib
import json
import sys
import time

import numpy as np

what = sys.argv[1]
t0 = time.time()
if what.startswith("cpu:"):  # one family of CPU kernels per process (no shared dispatchers)
    from sortgrad import kernels as K
    part = what[4:]
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        for n in (100, 3000):
            x = rng.standard_normal((4, n)).astype(dt)
            p = np.argsort(rng.random((4, n)), -1).astype(np.int32)
            if part == "segmented_sort":
                K.segmented_sort(x); K.segmented_sort(x, descending=True)
                K.segmented_sort(x, reverse=True); K.segmented_argsort(x)
            elif part == "top_k":
                K.top_k(x, 16); K.top_k(x, 100)
            elif part == "permutation":
                K.inverse_permutation(p); K.permutation_scatter(x, p, n)
            elif part == "isotonic":
                for reg in ("l2", "kl"):
                    sol, ids = K.isotonic_regression(x, x[0], regularization=reg)
                    K.isotonic_regression_vjp(x, x, x[0], ids, regularization=reg)
            elif part == "soft":
                for reg in ("l2", "kl"):
                    r = K.soft_rank(x, 1.0, regularization=reg)
                    K.soft_rank_vjp(x, x, r[0], r[1], r[2], 1.0, regularization=reg)
                    s = K.soft_sort(x, 1.0, regularization=reg)
                    K.soft_sort_vjp(x, x, s[1], s[2], 1.0, regularization=reg)
                m = K.soft_top_k_mask(x, 5, 1.0)
                K.soft_top_k_mask_vjp(x, x, m[1], m[2], 1.0)
        if part == "segmented_sort":
            K.segmented_sort(rng.standard_normal(3000).astype(dt), np.array([0, 5, 1000, 3000]))
    if part in ("segmented_sort", "top_k"):
        for dt in (np.int32, np.int64, np.uint8, np.bool_, np.float16):
            x = (rng.standard_normal((4, 500)) * 50).astype(dt)
            if part == "top_k":
                K.top_k(x, 8)
            else:
                K.segmented_sort(x)
    print(f"PREWARM {what} numba kernels {time.time() - t0:.1f} s")
else:
    import cupy  # noqa: F401
    from sortgrad.kernels._cuda import cupy_loader as L
    package = f"sortgrad.kernels.{what}"
    module = importlib.import_module(f"{package}._cupy")
    report = {"package": what, "files": {}}
    for filename, exprs in module.CUDA_SOURCES.items():
        t = time.time()
        mod = L.get_module(package, filename, exprs)
        kernels = {}
        for e in exprs:
            a = mod.get_function(e).attributes
            kernels[e] = [a.get("num_regs"), a.get("shared_size_bytes"),
                          a.get("local_size_bytes")]
        report["files"][filename] = {"compile_s": round(time.time() - t, 2),
                                     "kernels_regs_shared_local": kernels}
    report["total_s"] = round(time.time() - t0, 2)
    print("PREWARM " + json.dumps(report))
PYEOF

cat > "$H/sanitize_work.py" <<'PYEOF'
"""Tiny calls of every kernel path through the public kernel API (sortgrad.kernels), for
compute-sanitizer. argv[1]: cupy | numba (device arrays of that backend) | cpu (NumPy: a
self-test of this driver). Every result is compared with the CPU backend; the last line says
how many agreed."""
import sys
import traceback

import numpy as np

mode = sys.argv[1]
from sortgrad import kernels as K  # noqa: E402

rng = np.random.default_rng(0)
if mode == "cupy":
    import cupy as cp
    dev, host, sync = cp.asarray, cp.asnumpy, cp.cuda.Device().synchronize
elif mode == "numba":
    from numba import cuda
    dev, host, sync = cuda.to_device, (lambda a: a.copy_to_host()), cuda.synchronize
else:
    dev, host, sync = (lambda a: a.copy()), np.asarray, (lambda: None)
stats = {"ok": 0, "mismatch": [], "error": []}


def to_host(out):
    return tuple(host(o) for o in out) if isinstance(out, tuple) else host(out)


def case(name, fn, args, exact=True, compare=None, tol=1e-4, **kw):
    """fn(*device args, **kw) against fn(*host args, **kw); compare: indices of outputs."""
    try:
        got = to_host(fn(*[dev(a) if isinstance(a, np.ndarray) else a for a in args], **kw))
        sync()
        want = fn(*args, **kw)
    except Exception:
        stats["error"].append(name)
        print(f"ERROR {name}\n{traceback.format_exc()[-1500:]}", flush=True)
        return
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for i in (compare if compare is not None else range(len(want))):
        a, b = np.asarray(got[i]), np.asarray(want[i])
        if exact:
            ok = a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
        else:
            scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-30)
            ok = a.shape == b.shape and bool(np.all(np.abs(a - b) <= tol * scale))
        if not ok:
            stats["mismatch"].append(f"{name}[{i}]")
            print(f"MISMATCH {name} output {i}", flush=True)
            return
    stats["ok"] += 1


def f(*shape, dt=np.float32):
    return rng.standard_normal(shape).astype(dt)


# segmented sort: small rows (one tile), long rows (tiles + merge passes), reverse, float64,
# integer / 16-bit keys, ragged CSR segments, argsort
for shape, kw in [((3, 100), {}), ((3, 100), {"descending": True}), ((2, 5000), {}),
                  ((2, 5000), {"reverse": True}), ((2, 2049), {"descending": True})]:
    case(f"segmented_sort{shape}{kw}", K.segmented_sort, [f(*shape)], **kw)
case("segmented_sort f64", K.segmented_sort, [f(2, 300, dt=np.float64)])
case("segmented_sort int32", K.segmented_sort, [(f(3, 500) * 100).astype(np.int32)])
case("segmented_sort f16", K.segmented_sort, [f(2, 700, dt=np.float16)])
case("segmented_sort ragged", lambda x: K.segmented_sort(x, np.array([0, 5, 40, 2100, 6000])),
     [f(6000)])
case("segmented_argsort", K.segmented_argsort, [f(2, 3000)], descending=True)
# top-k: register rows, sort path (k > 32 on a block row), warp filter (vector / scalar loads),
# radix select, split rows with the reduction (filter and radix), k > 2048
for shape, k in [((4, 200), 5), ((4, 1000), 64), ((4, 3000), 16), ((4, 3001), 16),
                 ((4, 3000), 100), ((1, 3 * 8192 + 8), 7), ((1, 3 * 8192 + 8), 300),
                 ((2, 5000), 3000)]:
    case(f"top_k{shape} k={k}", K.top_k, [f(*shape), k])
# permutations: staged (shared memory) and direct scatter, inverse
for n, dt in [(100, np.float32), (9000, np.float32), (5000, np.float64)]:
    p = np.argsort(rng.random((2, n)), -1).astype(np.int32)
    case(f"permutation_scatter n={n} {np.dtype(dt).name}", K.permutation_scatter,
         [f(2, n, dt=dt), p, n])
    case(f"inverse_permutation n={n}", K.inverse_permutation, [p])
# isotonic regression and its VJP: small and large kernels, L2 and KL, f32 / f64, shared and
# per-row anchors
for reg in ("l2", "kl"):
    for n, dt in [(100, np.float64), (3000, np.float64), (3000, np.float32)]:
        s = -np.sort(-f(3, n, dt=dt) * 10, axis=-1)
        w = np.arange(n, 0, -1).astype(dt) if reg == "l2" else np.log(np.arange(n, 0, -1)).astype(dt)
        name = f"isotonic {reg} n={n} {np.dtype(dt).name}"
        case(name, K.isotonic_regression, [s, w], exact=False, compare=[0], regularization=reg)
        sol, ids = K.isotonic_regression(s, w, regularization=reg)
        case(name + " vjp", K.isotonic_regression_vjp, [f(3, n, dt=dt), s, w, ids],
             exact=False, regularization=reg)
    s = f(2, 500, dt=np.float64)
    case(f"isotonic {reg} per-row w", K.isotonic_regression, [s, f(2, 500, dt=np.float64)],
         exact=False, compare=[0], regularization=reg)
# soft ops (compositions: sort -> prep -> PAV -> finish) and their VJPs: staged rows (n <= 2048)
# and one row per block
for n in (300, 5000):
    x, g = f(3, n), f(3, n)
    for reg in ("l2", "kl"):
        for desc in (False, True):
            name = f"soft_rank {reg} n={n} desc={desc}"
            case(name, K.soft_rank, [x, 1.0], exact=False, compare=[0], regularization=reg,
                 descending=desc)
            r, p, b = K.soft_rank(x, 1.0, regularization=reg, descending=desc)
            case(name + " vjp", K.soft_rank_vjp, [g, x, r, p, b, 1.0], exact=False,
                 regularization=reg, descending=desc)
        name = f"soft_sort {reg} n={n}"
        case(name, K.soft_sort, [x, 0.1], exact=False, compare=[0], regularization=reg)
        v, p, b = K.soft_sort(x, 0.1, regularization=reg)
        case(name + " vjp", K.soft_sort_vjp, [g, x, p, b, 0.1], exact=False, regularization=reg)
    case(f"soft_top_k_mask n={n}", K.soft_top_k_mask, [x, 10, 1.0], exact=False, compare=[0])
    m, p, b = K.soft_top_k_mask(x, 10, 1.0)
    case(f"soft_top_k_mask n={n} vjp", K.soft_top_k_mask_vjp, [g, x, p, b, 1.0], exact=False)
sync()
print(f"SANITIZE_WORK_DONE {mode} ok={stats['ok']} mismatch={len(stats['mismatch'])} "
      f"error={len(stats['error'])} {stats['mismatch'][:10]} {stats['error'][:10]}", flush=True)
PYEOF

cat > "$H/summary.py" <<'PYEOF'
"""The check's summary (argv: work dir, out dir): pass/fail per phase, test counts, sanitizer
results, the benchmark targets and headline ratios. Printed and written to OUT/summary.txt."""
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

W, OUT = sys.argv[1], sys.argv[2]
lines = []
add = lines.append


def load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except Exception:
        return None


def status_of(phase):
    try:
        return open(os.path.join(W, f"status_{phase}")).read().split()
    except Exception:
        return ["?", "?"]


verdicts = {}
add("=== sortgrad GPU check: summary ===")
env = load(os.path.join(OUT, "env.json")) or {}
c, j, v = env.get("cupy") or {}, env.get("jax") or {}, env.get("versions") or {}
add(f"device {c.get('device') or j.get('device_kind')} cc {c.get('cc')} SMs {c.get('sm_count')} "
    f"L2 {c.get('l2_bytes')} driver {c.get('driver')} runtime {c.get('runtime')} nvrtc "
    f"{c.get('nvrtc')}")
add("versions " + " ".join(f"{k}={v.get(k)}" for k in ("jax", "jaxlib", "jax-cuda13-plugin",
    "cupy-cuda13x", "numba", "numba-cuda", "torch", "torchsort", "pytest-timeout")))
add(f"jax backend {j.get('backend')}; sortgrad {env.get('sortgrad')}")
for k in ("cupy_error", "numba_error", "jax_error", "sortgrad_error"):
    if k in env:
        add(f"!! {k}: {env[k]}")
verdicts["1 env"] = "PASS" if env and "jax_error" not in env and "sortgrad_error" not in env \
    and j.get("backend") == "gpu" else "FAIL"

rc, secs = status_of("prewarm")
pre = open(os.path.join(W, "prewarm.log"), errors="replace").read() if os.path.exists(
    os.path.join(W, "prewarm.log")) else ""
cupy_pre = [f"{m.group(1)} {m.group(2)} s" for m in
            re.finditer(r'"package": "(\w+)".*?"total_s": ([\d.]+)', pre)]
cpu_pre = [f"{m.group(1)} {m.group(2)} s" for m in
           re.finditer(r"PREWARM cpu:(\w+) numba kernels ([\d.]+) s", pre)]
add(f"--- prewarm (rc {rc}, {secs} s): CuPy NVRTC {', '.join(cupy_pre) or 'none'}; CPU Numba "
    f"{', '.join(cpu_pre) or 'none'}")
verdicts["2 prewarm"] = "PASS" if rc == "0" else "FAIL"

rc, secs = status_of("tests")
add(f"--- phase 3 tests (pytest -m gpu; {secs} s) ---")
total = {"tests": 0, "passed": 0, "failures": 0, "errors": 0, "skipped": 0}
bad, incomplete, failed_ids = [], [], []
for log in sorted(glob.glob(os.path.join(W, "pytest_*.log"))):
    name = os.path.basename(log)[len("pytest_"):-len(".log")]
    text = open(log, errors="replace").read()
    m = re.search(r"\[exit (\d+) after (\d+) s\]", text)
    code, took = (int(m.group(1)), m.group(2)) if m else (None, "?")
    counts = None
    xml = os.path.join(W, f"junit_{name}.xml")
    if os.path.exists(xml):
        try:
            root = ET.parse(xml).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            counts = {k: sum(int(s.get(k, 0)) for s in suites)
                      for k in ("tests", "failures", "errors", "skipped")}
            for tc in root.iter("testcase"):
                if tc.find("failure") is not None or tc.find("error") is not None:
                    failed_ids.append(f"{tc.get('classname')}::{tc.get('name')}")
        except Exception as err:
            counts = None
            add(f"  {name}: junit unreadable ({err})")
    last = re.findall(r"^=+ (.*? in [\d.]+s.*?) =+$", text, re.M)
    state = {0: "ok", 1: "FAILED", 5: "no tests", 124: "TIMEOUT", 130: "INTERRUPTED",
             137: "KILLED"}.get(code, f"exit {code}")
    if code in (2, 3, 4) or code is None:
        state = f"ERROR (exit {code})"
    if counts:
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        for k in total:
            total[k] += counts[k]
        shown = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} "
                 f"errors, {counts['skipped']} skipped")
    else:
        shown = last[-1] if last else "no summary line"
    add(f"  {name:34s} {state:11s} {took:>4} s  {shown}")
    if code not in (0, 5):
        (incomplete if code in (124, 130, 137, None) else bad).append(name)
add(f"  total: {total['tests']} tests, {total['passed']} passed, {total['failures']} failed, "
    f"{total['errors']} errors, {total['skipped']} skipped (from JUnit XML)")
for fid in failed_ids[:25]:
    add(f"    FAILED {fid}")
if len(failed_ids) > 25:
    add(f"    ... {len(failed_ids) - 25} more (tests.log)")
verdicts["3 tests"] = ("FAIL" if bad or total["failures"] or total["errors"] else
                       "INCOMPLETE" if incomplete else "NONE" if not total["tests"] else
                       "ALL-SKIPPED" if not total["passed"] else "PASS")
if incomplete:
    add(f"  cut by the time limit: {', '.join(incomplete)}")

add("--- phase 3 compute-sanitizer ---")
san = open(os.path.join(W, "sanitizer.log"), errors="replace").read() if os.path.exists(
    os.path.join(W, "sanitizer.log")) else ""
san_state = []
for m in re.finditer(r"^### (\S+) (\S+) exit (\S+) after (\d+) s$", san, re.M):
    tool, which, code, took = m.groups()
    block = san[:m.start()].rsplit(f"### {tool} {which}\n", 1)[-1]
    summ = re.findall(r"(?:ERROR|RACECHECK|SYNCCHECK) SUMMARY: [^\n]*", block)
    done = re.findall(r"SANITIZE_WORK_DONE [^\n]*", block)
    unsupported = "not supported" in block.lower()
    clean = code == "0" and bool(done) and " mismatch=0 " in done[-1]
    st = ("UNSUPPORTED" if unsupported else "TIMEOUT" if code in ("124", "137") else
          "FAIL" if not clean else "PASS" if " error=0 " in done[-1] else "DRIVER-ERRORS")
    san_state.append(st)
    add(f"  {tool:9s} {which:5s} {st:11s} exit {code} {took} s  {summ[-1] if summ else ''}  "
        f"{done[-1][18:120] if done else 'driver did not finish'}")
if "compute-sanitizer not found" in san:
    add("  compute-sanitizer not found")
verdicts["3 sanitizer"] = ("NONE" if not san_state else "FAIL" if "FAIL" in san_state else
                           "DRIVER-ERRORS" if "DRIVER-ERRORS" in san_state else
                           "UNSUPPORTED" if all(s == "UNSUPPORTED" for s in san_state) else
                           "INCOMPLETE" if "TIMEOUT" in san_state else "PASS")

add("--- phase 4 bench_jax_gpu.py (sortgrad's JAX ops vs XLA, host path, torchsort) ---")
bj = load(os.path.join(OUT, "bench_jax.json"))
rc, secs = status_of("bench_jax")
if bj is None:
    add(f"  no JSON (exit {rc}); see bench.log")
    verdicts["4 bench_jax"] = "FAIL"
else:
    add(f"  exit {rc}, {secs} s; copy bandwidth {bj.get('copy_bandwidth_GBps') or 0:.0f} GB/s; "
        f"{len(bj.get('records', []))} records; failed checks {len(bj.get('failed_checks', []))}; "
        f"errors {len(bj.get('errors', []))}; budget exhausted {bj.get('budget_exhausted')} "
        f"({len(bj.get('skipped', []))} cases skipped)")
    for fc in bj.get("failed_checks", [])[:8]:
        add(f"    FAILED CHECK {fc[:200]}")
    for e in [e for e in bj.get("errors", []) if not e.startswith("Traceback")][:6]:
        add(f"    ERROR {e[:200]}")
    for note in bj.get("notes", [])[:4]:
        add(f"    note: {note[:160]}")
    met = {True: 0, False: 0, None: 0}
    groups = {}
    for t in bj.get("targets", []):
        met[t["met"]] += 1
        case = t["target"].split(":")[0]
        mark = {True: "", False: "!", None: "?"}[t["met"]]
        val = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        if case.startswith("per_call/"):
            _, op, mode = case.split("/")
            key = (t.get("backend"), f"per-call excess over jnp, us, <= 30 ({mode})")
            groups.setdefault(key, []).append(f"{op} {val}{mark}")
        elif case.startswith("soft_"):
            what = "host path" if "host path" in t["target"] else "torchsort"
            key = (t.get("backend"), f"{case}: speedup, >= 10")
            groups.setdefault(key, []).append(f"vs {what} {val}{mark}")
        else:
            label, shape = case.split("/")
            key = (t.get("backend"), f"{shape}: time sortgrad / XLA, <= 1")
            groups.setdefault(key, []).append(f"{label} {val}{mark}")
    for (backend, title), items in groups.items():
        add(f"    [{backend}] {title}: " + ", ".join(items))
    for r in bj.get("records", []):  # the headline case in milliseconds
        if r["case"] == "soft_rank_l2/fwd+bwd/4096x1024":
            add(f"    [{r.get('run_backend')}] soft_rank_l2 fwd+bwd 4096x1024 {r['impl'][:34]}: "
                f"{r['median_ms']:.3f} ms")
    add(f"  targets: {met[True]} met, {met[False]} missed (!), {met[None]} not measured (?)")
    verdicts["4 bench_jax"] = "FAIL" if bj.get("failed_checks") else (
        "PASS" if rc in ("0", "130", "124") and bj.get("records") else f"exit {rc}")
for name in ("cupy", "numba"):
    b = load(os.path.join(OUT, f"bench_{name}.json"))
    rc, secs = status_of(f"bench_{name}")
    add(f"--- phase 4 bench_gpu_{name}.py (exit {rc}, {secs} s) ---")
    if b is None:
        add("  no JSON (skipped, timed out or failed: bench.log)")
        verdicts[f"4 bench_{name}"] = "SKIPPED" if rc == "skipped" else "FAIL"
        continue
    add(f"  smoke {b.get('smoke')}; copy bandwidth {b.get('copy_bandwidth_GBps') or 0:.0f} GB/s; "
        f"failed checks {b.get('failed_checks')}")
    best = {}
    for r in b.get("records", []):
        if not r["impl"].startswith("sortgrad") and (
                r["case"] not in best or r["median_ms"] < best[r["case"]][1]):
            best[r["case"]] = (r["impl"], r["median_ms"])
    for r in b.get("records", []):
        if r["impl"].startswith("sortgrad"):
            bl = best.get(r["case"])
            fb = r.get("fraction_of_copy_bandwidth")
            add(f"  {r['case']:>26} {r['median_ms']:9.3f} ms  bw {fb if fb is None else round(fb, 3)}"
                f"  agree {r['agree']}" + (f"  | best baseline {bl[0]} {bl[1]:.3f} ms" if bl else ""))
    verdicts[f"4 bench_{name}"] = "PASS" if rc == "0" else "FAIL"
add("--- verdicts ---")
add("  " + "   ".join(f"{k}: {v}" for k, v in verdicts.items()))
text = "\n".join(lines)
with open(os.path.join(OUT, "summary.txt"), "w") as fh:
    fh.write(text + "\n")
print(text)
PYEOF
}

if [ "${1:-}" = "--helpers" ]; then
  write_helpers "${2:?usage: gpu_check.sh --helpers DIR}"
  exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # phases 1-3: many processes share the GPU
OUT="${OUT:-/tmp/sgcheck-out}"
mkdir -p "$OUT"
rm -rf "$W"; mkdir -p "$W"
write_helpers "$W"
status() { echo "$2 $3" > "$W/status_$1"; }  # phase rc seconds

# ------------------------------------------------------------------------ phases 1 and 2 ---
# Phase 2 (prewarm) starts with phase 1: they are independent, and both wait for the same
# first import (it records the Numba cache digest once, before any process compiles).
timeout -k 5 60 $PY -c "import sortgrad.kernels" > "$W/first_import.log" 2>&1 || {
  echo "!! import sortgrad.kernels failed:"; tail -20 "$W/first_import.log"; }
say "phase 1: environment probe and collection of the gpu-marked tests (<=40 s)"
t1=$(date +%s)
timeout -k 5 40 $PY -m pytest --collect-only -q -p no:cacheprovider -m gpu tests \
  > "$W/collect.txt" 2>&1 &
collect_pid=$!
timeout -k 5 40 $PY "$W/env_probe.py" "$OUT/env.json" > "$W/env_probe.log" 2>&1 &
probe_pid=$!
say "phase 2: prewarm (<=80 s, parallel): CuPy NVRTC modules, CPU Numba kernels"
t2=$(date +%s)
pids=()
for pkg in $(ls -d sortgrad/kernels/*/ | xargs -n1 basename); do
  [ -f "sortgrad/kernels/$pkg/_cupy.py" ] || continue
  timeout -k 5 80 $PY "$W/prewarm.py" "$pkg" > "$W/prewarm_cupy_$pkg.log" 2>&1 &
  pids+=($!)
  NUMBA_NUM_THREADS=2 timeout -k 5 80 $PY "$W/prewarm.py" "cpu:$pkg" \
    > "$W/prewarm_cpu_$pkg.log" 2>&1 &
  pids+=($!)
done
# The benchmark peers the machine lacks, carried in perf/peers (SHA256SUMS): OTT-JAX and jaxopt
# (wheels) and torchsort (its sdist, built here against the machine's torch with nvcc, sm_90
# only), installed into $W/peers in the background; phase 4 puts them on PYTHONPATH.
PEERS="$W/peers"
( cd perf/peers && sha256sum -c --quiet SHA256SUMS ) > "$W/peers.log" 2>&1 && \
  ( timeout -k 5 60 $PY -m pip install --no-index --no-deps --target "$PEERS" \
      perf/peers/*.whl >> "$W/peers.log" 2>&1; w=$?
    TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=4 timeout -k 5 150 $PY -m pip install --no-index \
      --no-deps --no-build-isolation --target "$PEERS/torchsort" perf/peers/torchsort-*.tar.gz \
      >> "$W/peers.log" 2>&1
    echo "peers: wheels exit $w, torchsort build exit $?" >> "$W/peers.log" ) &
peers_pid=$!
wait $probe_pid; rc=$?
wait $collect_pid
[ -s "$OUT/env.json" ] || echo "{\"error\": \"env probe failed (exit $rc)\"}" > "$OUT/env.json"
tail -3 "$W/env_probe.log"
echo "collected: $(tail -1 "$W/collect.txt")"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
PT_TIMEOUT=""; $PY -c "import pytest_timeout" 2>/dev/null && PT_TIMEOUT="--timeout=100"
status env $rc $(( $(date +%s) - t1 ))
say "phase 1 done (exit $rc, $(( $(date +%s) - t1 )) s; sanitizer: ${SAN:-none}; pytest-timeout: ${PT_TIMEOUT:-no})"
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
for f in "$W"/prewarm_c*.log; do echo "== $(basename "$f")"; tail -c 6000 "$f"; done > "$W/prewarm.log"
grep -h -o -E 'PREWARM (cpu:[a-z_]+ numba kernels [0-9.]+ s|\{"package": "[a-z_]+")' "$W/prewarm.log" \
  | tr '\n' ';'; echo
status prewarm $rc $(( $(date +%s) - t2 ))
say "phase 2 done (exit $rc, $(( $(date +%s) - t2 )) s)"

# ------------------------------------------------------------------------------ phase 3 ---
T3=$(( $(left) - 175 )); [ "$T3" -gt 180 ] && T3=180; [ "$T3" -lt 60 ] && T3=60
say "phase 3: gpu-marked tests and compute-sanitizer, concurrently (<=${T3} s)"
t0=$(date +%s)
SPLIT_AT=${SPLIT_AT:-400}
run_pt() {  # name, -k expression ("" for none), files...
  local name=$1 kexpr=$2; shift 2
  local t=$(date +%s) kargs=()
  [ -n "$kexpr" ] && kargs=(-k "$kexpr")
  NUMBA_NUM_THREADS=2 timeout -s INT -k 15 "$T3" $PY -m pytest -q -p no:cacheprovider \
    -rfE --tb=short $PT_TIMEOUT -m "$MARK" "${kargs[@]}" --junitxml="$W/junit_$name.xml" "$@" \
    > "$W/pytest_$name.log" 2>&1
  echo "[exit $? after $(( $(date +%s) - t )) s]" >> "$W/pytest_$name.log"
}
COLLECTED=$(grep -c '::' "$W/collect.txt" 2>/dev/null); COLLECTED=${COLLECTED:-0}
count() {  # file, family: gpu tests collected for them (node-id substring rule of the -k's)
  if [ "$COLLECTED" -eq 0 ]; then echo 1; return; fi  # no collection: one group per family
  awk -v f="$1" -v fam="$2" 'index($0, f "::") == 1 {
      c = index($0, "cupy") > 0; l = index($0, "lowered") > 0
      if (fam == "any" || (fam == "cupy" && c) || (fam == "numba" && !c && !l) ||
          (fam == "lowered" && !c && l)) n++
    } END { print n + 0 }' "$W/collect.txt"
}
MARK=gpu
ngroups=0
for f in $(ls tests/kernels/test_*_backends.py); do
  op=$(basename "$f" .py); op=${op#test_}; op=${op%_backends}
  for fam in cupy numba lowered; do
    case $fam in
      cupy) k="cupy" ;;
      numba) k="not cupy and not lowered" ;;
      lowered) k="not cupy and lowered" ;;
    esac
    n=$(count "$f" "$fam")
    [ "$n" -eq 0 ] && continue
    if [ "$n" -gt "$SPLIT_AT" ]; then
      run_pt "${op}_${fam}_float" "($k) and float" "$f" &
      run_pt "${op}_${fam}_other" "($k) and not float" "$f" &
      ngroups=$((ngroups + 2))
    else
      run_pt "${op}_${fam}" "$k" "$f" &
      ngroups=$((ngroups + 1))
    fi
  done
done
others=$(ls tests/kernels/test_*.py tests/test_*.py 2>/dev/null | grep -v '_backends\.py$')
# shellcheck disable=SC2086
run_pt kernels_other "" $others &
if [ "${SG_BINDINGS_ALL:-0}" = 1 ]; then
  X=""; $PY -c "import xdist" 2>/dev/null && X="-n 4"
  # shellcheck disable=SC2086
  MARK="not slow" run_pt bindings_all "" $X tests/bindings &
else  # one process per bindings file that has gpu-marked tests (JAX compiles per test)
  nb=0
  for f in $(ls tests/bindings/test_*.py 2>/dev/null); do
    [ "$(count "$f" any)" -eq 0 ] && continue
    run_pt "bindings_$(basename "$f" .py | sed 's/^test_//')" "" "$f" &
    nb=$((nb + 1)); ngroups=$((ngroups + 1))
  done
  [ "$nb" -eq 0 ] && { run_pt bindings "" tests/bindings & ngroups=$((ngroups + 1)); }
fi
ngroups=$((ngroups + 1))
say "  $ngroups pytest processes started"
(
  if [ -z "$SAN" ]; then
    echo "### compute-sanitizer not found"
    exit 0
  fi
  end=$(( $(date +%s) + T3 - 5 ))
  for spec in "memcheck cupy 55" "racecheck cupy 60" "synccheck cupy 45" "racecheck numba 60"; do
    set -- $spec
    t=$(date +%s); budget=$(( end - t )); [ "$budget" -gt "$3" ] && budget=$3
    [ "$budget" -lt 10 ] && { echo "### $1 $2 skipped (no time left)"; continue; }
    echo "### $1 $2"
    extra=""; [ "$1" = memcheck ] && extra="--leak-check no"
    JAX_PLATFORMS=cpu timeout -k 5 "$budget" "$SAN" --tool "$1" $extra --error-exitcode 9 \
      --print-limit 20 $PY "$W/sanitize_work.py" "$2" > "$W/san_$1_$2.log" 2>&1
    code=$?
    grep -v '^=========     ' "$W/san_$1_$2.log" | tail -60
    echo "### $1 $2 exit $code after $(( $(date +%s) - t )) s"
  done
) > "$W/sanitizer.log" 2>&1 &
wait
grep -h '^\[exit' "$W"/pytest_*.log | sort | uniq -c | sed 's/^/  /'
status tests 0 $(( $(date +%s) - t0 ))
say "phase 3 done ($(( $(date +%s) - t0 )) s)"

# ------------------------------------------------------------------------------ phase 4 ---
unset XLA_PYTHON_CLIENT_PREALLOCATE   # alone on the GPU now: JAX's default allocator
wait $peers_pid 2>/dev/null
say "$(tail -1 "$W/peers.log")"
[ -d "$PEERS" ] && export PYTHONPATH="$PYTHONPATH:$PEERS:$PEERS/torchsort"
L4=$(( $(left) - 15 ))
TJ=$(( L4 * 60 / 100 )); TC=$(( L4 * 25 / 100 )); TN=$(( L4 - TJ - TC ))
say "phase 4: benchmarks alone on the GPU (${L4} s: jax ${TJ}, cupy ${TC}, numba ${TN})"
t0=$(date +%s)
: > "$W/bench.log"
if [ "$TJ" -ge 30 ]; then
  BUDGET=$(( TJ - 30 ))
  t=$(date +%s)
  timeout -s INT -k 15 "$TJ" $PY perf/bench_jax_gpu.py --backend both --budget-s "$BUDGET" \
    --rounds 5 --batch-ms 25 --out "$OUT/bench_jax.json" > "$W/bench_jax.log" 2>&1
  rc=$?; status bench_jax $rc $(( $(date +%s) - t ))
  say "  bench_jax_gpu.py exit $rc ($(( $(date +%s) - t )) s)"
else
  status bench_jax skipped 0
fi
if [ "$TC" -ge 20 ]; then
  t=$(date +%s)
  CARGS=(--only 'sort_rows1024,sort_rows4096,top_k*,pav_l2_*' --warmup 2 --repeats 5)
  [ "$TC" -lt 40 ] && CARGS=(--smoke)
  timeout -s INT -k 10 "$TC" $PY perf/bench_gpu_cupy.py "${CARGS[@]}" \
    --out "$OUT/bench_cupy.json" > "$W/bench_cupy.log" 2>&1
  rc=$?; status bench_cupy $rc $(( $(date +%s) - t ))
  say "  bench_gpu_cupy.py ${CARGS[*]}: exit $rc ($(( $(date +%s) - t )) s)"
else
  status bench_cupy skipped 0
fi
TN=$(( $(left) - 15 ))
if [ "$TN" -ge 20 ]; then
  t=$(date +%s)
  timeout -s INT -k 10 "$TN" $PY perf/bench_gpu_numba.py --smoke --out "$OUT/bench_numba.json" \
    > "$W/bench_numba.log" 2>&1
  rc=$?; status bench_numba $rc $(( $(date +%s) - t ))
  say "  bench_gpu_numba.py --smoke: exit $rc ($(( $(date +%s) - t )) s)"
else
  status bench_numba skipped 0
fi
say "phase 4 done ($(( $(date +%s) - t0 )) s)"

# ------------------------------------------------------------------------------ phase 5 ---
say "phase 5: collect and summarize"
clip() {  # file: all of it when small, else its head and tail
  if [ "$(wc -c < "$1")" -le 60000 ]; then cat "$1"
  else head -c 20000 "$1"; echo; echo "[... $(wc -c < "$1") bytes in all ...]"; tail -c 40000 "$1"
  fi
}
for f in "$W"/pytest_*.log; do
  [ -f "$f" ] || continue
  echo "######## $(basename "$f")"; clip "$f"
done | head -c 8000000 > "$OUT/tests.log"
{ cat "$W/sanitizer.log"; for f in "$W"/san_*.log; do
    [ -f "$f" ] || continue
    echo "######## $(basename "$f") (tail)"; tail -c 20000 "$f"; done; } \
  | head -c 4000000 > "$OUT/sanitizer.log"
{ echo "######## peers"; tail -c 3000 "$W/peers.log"; echo "######## prewarm"; cat "$W/prewarm.log"
  for b in jax cupy numba; do
    echo "######## bench_$b"; [ -f "$W/bench_$b.log" ] && tail -c 200000 "$W/bench_$b.log"
  done; } | head -c 4000000 > "$OUT/bench.log"
ls -la "$OUT"
say "total $(elapsed) s"
timeout -k 5 30 $PY "$W/summary.py" "$W" "$OUT" 2>&1 | tail -200
