"""GPU benchmark of sortgrad's jitted JAX ops against XLA's own ops, sortgrad's host path and
torchsort, all on the same device.

Cases (float32; the last axis is the sorted one):
  per-call  8 elements: jit(op)(x) blocked after every call ("jit-latency", every op), the
            public op called directly, blocked ("eager-latency": sort, argsort, top_k1,
            soft_rank), back-to-back jitted calls blocked once per batch ("jit-throughput":
            sort); sortgrad.sort / argsort / top_k(1, 8) / soft_rank(l2) fwd and fwd+bwd
            against jnp.sort, jnp.argsort(stable=True), lax.top_k, the hard rank
            argsort(argsort(x)) + 1 and the grad of a jnp.sort loss. Reported: the time per
            call and its excess over the jnp op (us); the target applies to both latencies.
  hard      sortgrad.sort, sortgrad.argsort, sortgrad.top_k(k = 1, 8, 64, 1024; k <= n) vs
            jnp.sort, jnp.argsort(stable=True), jax.lax.top_k, forward.
  soft      sortgrad.soft_rank / soft_sort, regularization "l2" and "kl", strength 1.0,
            "fwd" (jit(op)) and "fwd+bwd" (jit(grad(lambda x, w: (op(x) * w).sum()))), against
            sortgrad's host path (the same function traced inside
            `sortgrad.callback_mode("pure")`: jax.pure_callback, a device -> host -> device
            round trip; only up to --host-max-elements), torchsort on the same device when
            `import torchsort` works (its CUDA build on a GPU) and a pure-JAX soft rank (OTT-JAX
            `ott.tools.soft_sort.ranks`, `softjax`) when importable and small enough (their
            transport / pairwise matrices are n x n per row).
Shapes: 4096x1024, 2^24 elements in rows of 1024 (16384x1024) and of 4096 (4096x4096),
16x65536; --smoke: 8 elements, 64x256 and 4x2048 (a few seconds, also on CPU-only JAX: then
the device is the CPU and the host path is still the comparison).

Order: the cases that carry a target first (per-call jit latency, soft_rank fwd+bwd at
4096x1024, the hard ops at 2^24), then the rest; --budget-s stops adding cases once exceeded
(the JSON lists what was skipped and says so).

Checks before timing (on the first input of each case): sort/argsort/top_k bit-identical to
the jnp / lax op (values and indices); soft ops finite, ranks in [1, n], soft sorts
non-decreasing (L2: with the row sums of x), gradients finite; where the host path runs, the device
result must agree with it (L2 forward: max |a - b| / max |b| <= 1e-4; KL and gradients are
recorded only: gradients are compared on a few rows after averaging over exactly tied inputs,
where each library splits the cotangent its own way). torchsort / OTT / softjax agreement is
recorded, never required. A failed required check, or an exception raised by a sortgrad op,
makes the exit status 1 (after the JSON).

Timing: every implementation is warmed up (compiled, one pass over its inputs), then timed in
--rounds interleaved rounds (each round times every implementation of the case once, in a
rotated order). One timing is a batch of calls of the jitted function over a rotation of
input arrays whose total size is at least twice the GPU's L2 (queried from CuPy or torch;
50 MB assumed otherwise), with jax.block_until_ready on the batch's last outputs (torch:
torch.cuda.synchronize): wall clock (time.perf_counter) over blocked batches, not CUDA
events (CuPy's events on the default stream do not see XLA's stream). Reported: median /
p25 / p75 / min per call over rounds, elements/s, the fraction of the copy bandwidth (jnp
`x + 1` measured in the same run) for the hard ops' minimal traffic, and for every
comparison `ratio_sortgrad_over_impl` (> 1: sortgrad slower) and `speedup_of_sortgrad`,
both from medians of the same run. JAX's allocator is left as the environment sets it
(XLA_PYTHON_CLIENT_PREALLOCATE etc. are recorded in the JSON).

GPU kernel backend: --backend cupy | numba | both (default cupy) calls
sortgrad.set_gpu_backend(...) and sets SORTGRAD_GPU_BACKEND before sortgrad is imported;
"both" runs each backend in its own process (a traced function keeps the backend it was
traced with) and merges the JSON. Without set_gpu_backend the JSON says so, and "both" runs
only the default backend.

Targets printed at the end (and in the JSON "targets"): soft_rank fwd+bwd at 4096x1024 at
least 10x faster than the host path and than torchsort; sort / argsort / top_k at 2^24 no
slower than XLA's; per-call cost on 8 elements at most 30 us over the jnp op.

  python perf/bench_jax_gpu.py                          # full run (needs a GPU)
  python perf/bench_jax_gpu.py --budget-s 90 --out r.json
  python perf/bench_jax_gpu.py --backend both --only 'soft_rank*'
  python perf/bench_jax_gpu.py --smoke --out /tmp/s.json   # tiny, CPU or GPU
Without a GPU (and without --smoke) the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PERF = Path(__file__).resolve().parent
if str(PERF) not in sys.path:  # perf/_common.py, also when this file is not run as a script
    sys.path.insert(0, str(PERF))

from _common import (RESULTS, device_tag, dist_version, format_shape, git_info,  # noqa: E402
                     gpu_props, nvidia_smi, parse_shape, selected, tie_group_mean,
                     timing_stats, utc_now, write_json)

EPS = 1.0
TOP_KS = (1, 8, 64, 1024)
SOFT_OPS = ("soft_rank", "soft_sort")
REGS = ("l2", "kl")
SHAPES = {"4096x1024": (4096, 1024), "16384x1024": (16384, 1024),
          "4096x4096": (4096, 4096), "16x65536": (16, 65536)}
SMOKE_SHAPES = {"64x256": (64, 256), "4x2048": (4, 2048)}
TARGET_SOFT_SHAPE = "4096x1024"
TARGET_HARD_SHAPES = ("16384x1024", "4096x4096")
TINY_N = 8
HOST_NAME = "sortgrad host path (pure_callback)"
SOFT_TOL_L2 = 1e-4
PER_CALL_TARGET_US = 30.0
SOFT_SPEEDUP_TARGET = 10.0
VERSIONS = ("numpy", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
            "jax-cuda12-pjrt", "cupy", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda",
            "llvmlite", "cuda-bindings", "torch", "torchsort", "ott-jax", "softjax")
TIMER = ("wall clock (time.perf_counter) around batches of calls of a jitted function over a "
         "rotation of inputs, jax.block_until_ready on the batch's last outputs (torch: "
         "torch.cuda.synchronize); per call = batch time / calls; median over interleaved "
         "rounds. Not CUDA events: CuPy's events on its default stream do not see XLA's stream.")


# --- environment ----------------------------------------------------------------------------

def environment(jax, device, sortgrad, gpu_backend_info) -> dict:
    plat = device.platform
    env = {
        **git_info(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_platform": plat,
        "device": getattr(device, "device_kind", str(device)),
        "jax_devices": [str(d) for d in jax.devices()],
        "gpu": gpu_props("gpu" if plat in ("gpu", "cuda") else plat),
        "nvidia_smi": (nvidia_smi("name,driver_version,memory.total,clocks.max.sm,clocks.sm,"
                                  "temperature.gpu,power.draw")
                       if plat in ("gpu", "cuda") else None),
        "versions": {name: dist_version(name) for name in VERSIONS},
        "sortgrad": {"path": getattr(sortgrad, "__file__", None),
                     "version": getattr(sortgrad, "__version__", None),
                     "callback_mode": _safe(lambda: sortgrad.get_callback_mode())},
        "gpu_backend": gpu_backend_info,
        "env": {k: os.environ[k] for k in sorted(os.environ)
                if k.startswith(("XLA_", "JAX_", "SORTGRAD_", "NUMBA_", "CUPY_", "TF_CPP"))},
    }
    env["versions"]["jax_runtime"] = jax.__version__
    return env


def _safe(fn):
    try:
        return fn()
    except Exception as err:
        return f"error: {err!r}"[:200]


# --- timing ---------------------------------------------------------------------------------

class Impl:
    """One implementation of a case: call(i) runs it on rotation input i (asynchronously where
    the library allows); sync(outputs) waits for them."""

    def __init__(self, name, call, sync, *, period=1, sortgrad=False, required=True,
                 note=None):
        self.name, self.call, self.sync, self.period = name, call, sync, period
        self.sortgrad, self.required, self.note = sortgrad, required, note
        self.calls = 1
        self.next = 0
        self.estimate = 0.0
        self.samples: list[float] = []

    @staticmethod
    def to_numpy(out):
        import jax
        return np.asarray(jax.device_get(out))


def _batch(impl: Impl, calls: int, blocking: bool) -> float:
    """Seconds per call of `calls` calls (blocked after each when `blocking`)."""
    recent = collections.deque(maxlen=4)
    start = impl.next
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for j in range(calls):
            out = impl.call(start + j)
            if blocking:
                impl.sync(out)
            else:
                recent.append(out)
        if not blocking:
            impl.sync(list(recent))
        dt = time.perf_counter() - t0
    finally:
        if gc_was:
            gc.enable()
    impl.next = start + calls
    return dt / calls


def time_interleaved(impls, *, rounds, target_s, max_calls, min_calls, case_max_s, blocking):
    """Warm up and calibrate every impl, then `rounds` interleaved rounds (each impl once per
    round, the order rotated); fills impl.samples and returns the number of rounds."""
    for impl in impls:
        per_call = _batch(impl, 1, blocking)  # warm-up (the impl was compiled by its check)
        if per_call < target_s:  # calibration: one pass over the rotation (more warm-up)
            per_call = _batch(impl, max(impl.period, min_calls), blocking)
        impl.calls = int(min(max_calls, max(min_calls, math.ceil(target_s / max(per_call,
                                                                                 1e-9)))))
        if per_call > target_s:  # a slow implementation: one call per sample
            impl.calls = 1
        impl.estimate = per_call * impl.calls
    round_s = sum(impl.estimate for impl in impls)
    n_rounds = rounds
    if round_s * rounds > case_max_s:
        n_rounds = max(3, int(case_max_s / max(round_s, 1e-9)))
    for r in range(n_rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            impl.samples.append(_batch(impl, impl.calls, blocking))
    return n_rounds


def _stats(samples):
    """timing_stats in microseconds of per-call seconds (count key "rounds")."""
    return timing_stats(np.asarray(samples, dtype=np.float64) * 1e6, unit="us",
                        count_key="rounds")


# --- checks ---------------------------------------------------------------------------------

def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}")))
    return bool(np.array_equal(a, b))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return None
    if not a.size:
        return 0.0
    diff = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def soft_invariants(op, reg, pass_, out, x, n) -> dict:
    out = np.asarray(out, np.float64)
    res = {"finite": bool(np.isfinite(out).all())}
    if pass_ == "fwd" and op == "soft_rank":
        tol = 1e-3 + 8 * np.finfo(np.float32).eps * n
        res["min"], res["max"] = float(out.min()), float(out.max())
        res["in_1_n"] = bool(out.min() >= 1 - tol and out.max() <= n + tol)
        res["agree"] = res["finite"] and res["in_1_n"]
    elif pass_ == "fwd" and op == "soft_sort":
        xs = np.asarray(x, np.float64)
        spread = float(np.abs(xs).max()) if xs.size else 1.0
        step = np.diff(out, axis=-1)
        res["non_decreasing"] = bool((step >= -1e-5 * max(spread, 1.0)).all())
        res["agree"] = res["finite"] and res["non_decreasing"]
        if reg == "l2":  # the L2 soft sort lies in the permutahedron of x: same row sums
            sums = rel_err(out.sum(-1), xs.sum(-1))
            res["row_sum_rel_err"] = sums
            res["agree"] = res["agree"] and sums is not None and sums <= 1e-3
    else:
        res["agree"] = res["finite"]
    res["check"] = "invariants"
    return res


# --- the benchmark --------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        self.args = args
        self.jax, self.jnp = jax, jnp
        self.t0 = time.monotonic()
        self.device = jax.devices()[0]
        self.platform = self.device.platform
        self.on_gpu = self.platform in ("gpu", "cuda")
        self.gpu_backend = self._select_backend(args.backend)
        import sortgrad
        self.sg = sortgrad
        self.result = {
            "tool": "perf/bench_jax_gpu.py", "argv": sys.argv[1:], "smoke": bool(args.smoke),
            "started": utc_now(), "finished": None, "timer": TIMER,
            "backend_requested": args.backend,
            "environment": environment(jax, self.device, sortgrad, self.gpu_backend),
            "budget_s": args.budget_s, "budget_exhausted": False, "elapsed_s": None,
            "records": [], "per_call": [], "targets": [], "failed_checks": [], "notes": [],
            "skipped": [], "errors": [],
        }
        gpu = self.result["environment"]["gpu"]
        l2 = gpu.get("l2_bytes") if self.on_gpu else None
        self.l2_bytes = int(l2) if l2 else (50 << 20)
        self.result["l2_bytes_used"] = self.l2_bytes
        self.result["l2_source"] = gpu.get("l2_source") if l2 else (
            "assumed 50 MB" if self.on_gpu else "assumed 50 MB (CPU run)")
        self.torch, self.torchsort, self.torch_device = self._load_torch()
        self.peers = self._load_jax_peers()
        self.inputs: dict = {}
        self.copy_bw = None

    # .. setup
    def _select_backend(self, backend):
        import sortgrad
        info = {"requested": backend,
                "set_gpu_backend_available": hasattr(sortgrad, "set_gpu_backend"),
                "effective": "yes: JAX runs on a GPU" if self.on_gpu else
                             "no: JAX runs on the CPU (the host kernels run)"}
        setter = getattr(sortgrad, "set_gpu_backend", None)
        if setter is not None:
            try:
                setter(backend)
                info["set"] = True
            except Exception as err:
                info["set"] = False
                info["error"] = repr(err)[:300]
        else:
            info["note"] = ("sortgrad.set_gpu_backend does not exist in this checkout: only "
                            "SORTGRAD_GPU_BACKEND was set; the backend is whatever the package "
                            "uses")
        getter = getattr(sortgrad, "get_gpu_backend", None)
        if getter is not None:
            info["active"] = _safe(getter)
        return info

    def _load_torch(self):
        if self.args.no_peers:
            return None, None, None
        try:
            import torchsort  # imports torch
            import torch
        except Exception as err:
            self.note(f"torchsort not importable ({type(err).__name__}: {err}): torchsort "
                      "comparisons skipped")
            return None, None, None
        if self.on_gpu:
            if not torch.cuda.is_available():
                self.note("torch sees no CUDA device: torchsort comparisons skipped")
                return torch, None, None
            return torch, torchsort, "cuda"
        return torch, torchsort, "cpu"

    def _load_jax_peers(self):
        peers = {}
        if self.args.no_peers:
            return peers
        try:
            from ott.tools import soft_sort as ott_soft_sort
            peers["ott.soft_sort.ranks"] = lambda x: ott_soft_sort.ranks(x, axis=-1)
        except Exception as err:
            self.note(f"OTT-JAX not importable ({type(err).__name__}): skipped")
        try:
            import softjax
            fn = getattr(softjax, "rank", None) or getattr(softjax, "ranking", None)
            if fn is None:
                self.note("softjax has no rank/ranking function: skipped")
            else:
                peers["softjax.rank"] = lambda x: fn(x, axis=-1)
        except Exception as err:
            self.note(f"softjax not importable ({type(err).__name__}): skipped")
        return peers

    # .. bookkeeping
    def note(self, text):
        self.result["notes"].append(text)
        print(f"  note: {text}", flush=True)

    def elapsed(self):
        return time.monotonic() - self.t0

    def over_budget(self):
        return self.args.budget_s is not None and self.elapsed() > self.args.budget_s

    def selected(self, name):
        return selected(name, self.args.only)

    def save(self):
        self.result["elapsed_s"] = round(self.elapsed(), 2)
        self.result["finished"] = utc_now()
        self.result["targets"] = self.targets()
        if self.args.out is None:
            return
        write_json(self.args.out, self.result)

    def jax_impl(self, name, fn, arg_sets, **kw):
        jax = self.jax

        def call(i):
            return fn(*arg_sets[i % len(arg_sets)])
        return Impl(name, call, jax.block_until_ready, period=len(arg_sets), **kw)

    # .. inputs
    def rotation(self, shape):
        """Device arrays x (a rotation of > 2x L2 in all) and one weight array w."""
        key = tuple(shape)
        if key in self.inputs:
            return self.inputs[key]
        jax = self.jax
        nbytes = int(np.prod(shape)) * 4
        if self.args.smoke:
            count = 3
        elif int(np.prod(shape)) <= 64:
            count = 8
        else:
            count = int(min(16, max(2, math.ceil(2 * self.l2_bytes / nbytes))))
        rng = np.random.default_rng(abs(hash(key)) % (1 << 31))
        host = [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]
        w_host = rng.standard_normal(shape, dtype=np.float32)
        xs = [jax.device_put(h, self.device) for h in host]
        w = jax.device_put(w_host, self.device)
        jax.block_until_ready(xs)
        entry = {"x": xs, "w": w, "x_host": host, "w_host": w_host, "count": count,
                 "bytes": count * nbytes}
        self.inputs[key] = entry
        return entry

    def timing_options(self, blocking=False, tiny=False):
        a = self.args
        return dict(rounds=a.rounds, target_s=(a.batch_ms / 1e3), max_calls=2000,
                    min_calls=8 if tiny else 1, case_max_s=a.case_max_s, blocking=blocking)

    # .. copy bandwidth
    def copy_bandwidth(self):
        jax = self.jax
        n = (1 << 18) if self.args.smoke else (1 << 26)
        xs = [jax.device_put(np.full(n, i, np.float32), self.device) for i in range(2)]
        f = jax.jit(lambda a: a + 1.0)
        impl = self.jax_impl("jnp x + 1", f, [(x,) for x in xs])
        impl.sync(f(xs[0]))
        time_interleaved([impl], **self.timing_options())
        s = np.median(impl.samples)
        self.copy_bw = 2 * n * 4 / s
        self.result["copy_bandwidth_GBps"] = self.copy_bw / 1e9
        self.result["copy_bandwidth_method"] = (f"jit(x + 1) on {n} float32 (read + write "
                                                "counted), same timer")
        print(f"copy bandwidth (jnp x + 1): {self.copy_bw / 1e9:.1f} GB/s", flush=True)

    # .. recording
    def record(self, case, op, pass_, shape, impls, checks, rounds, rotation, min_bytes=None):
        elements = int(np.prod(shape))
        recs = []
        for impl in impls:
            st = _stats(impl.samples)
            rec = {"case": case, "op": op, "pass": pass_, "shape": list(shape),
                   "shape_str": format_shape(shape), "elements": elements,
                   "impl": impl.name, "sortgrad": impl.sortgrad,
                   "gpu_backend": self.args.backend if impl.sortgrad else None,
                   "run_backend": self.args.backend,
                   **st, "median_ms": st["median_us"] / 1e3, "calls_per_batch": impl.calls,
                   "rotation_arrays": rotation["count"], "rotation_bytes": rotation["bytes"],
                   "elements_per_s": elements / (st["median_us"] * 1e-6),
                   "check": checks.get(impl.name)}
            if min_bytes and self.copy_bw:
                rec["fraction_of_copy_bandwidth"] = (min_bytes / (st["median_us"] * 1e-6)
                                                     / self.copy_bw)
            if impl.note:
                rec["note"] = impl.note
            recs.append(rec)
        sg = next((r for r in recs if r["impl"] == "sortgrad"), None)
        for rec in recs:
            if sg is not None and rec is not sg:
                rec["sortgrad_median_us"] = sg["median_us"]
                rec["ratio_sortgrad_over_impl"] = sg["median_us"] / rec["median_us"]
                rec["speedup_of_sortgrad"] = rec["median_us"] / sg["median_us"]
        self.result["records"].extend(recs)
        line = "  ".join(
            f"{r['impl']} {r['median_us'] / 1e3:.3f} ms"
            + (f" (x{r['speedup_of_sortgrad']:.2f})" if "speedup_of_sortgrad" in r else "")
            + (" DISAGREE" if (r["check"] or {}).get("agree") is False else "")
            for r in recs)
        print(f"{case:<34} [{rounds} rounds] {line}", flush=True)

    def check_required(self, case, impl, check):
        if impl.required and impl.sortgrad and not check.get("agree", False):
            self.result["failed_checks"].append(f"{case} {impl.name}: {check}")

    def error(self, case, impl_name, err):
        """Records an exception; one of sortgrad's (or of a whole case) is also a failed check
        (the exit status says so); a peer's (torchsort, OTT, softjax, jnp) is only recorded."""
        text = f"{case} {impl_name}: {type(err).__name__}: {err}"[:1000]
        self.result["errors"].append(text)
        if impl_name.startswith("sortgrad") or impl_name in ("case", "timing"):
            self.result["failed_checks"].append(f"raised: {text[:300]}")
        print(f"  ERROR {text}", flush=True)

    # .. per-call cost
    def per_call(self, which=("jit-latency", "eager-latency", "jit-throughput")):
        jax, jnp, sg = self.jax, self.jnp, self.sg
        rot = self.rotation((TINY_N,))
        xs = [(x,) for x in rot["x"]]
        xws = [(x, rot["w"]) for x in rot["x"]]

        def soft(x):
            return sg.soft_rank(x, regularization_strength=EPS, regularization="l2")

        def hard_rank(x):
            return (jnp.argsort(jnp.argsort(x, stable=True), stable=True) + 1).astype(x.dtype)
        jl, el, jt = "jit-latency", "eager-latency", "jit-throughput"
        # (label, sortgrad fn, jnp fn, eager jnp fn, arguments, modes)
        ops = [
            ("sort", sg.sort, jnp.sort, jnp.sort, xs, (jl, el, jt)),
            ("argsort", sg.argsort, lambda x: jnp.argsort(x, stable=True),
             lambda x: jnp.argsort(x, stable=True), xs, (jl, el)),
            ("top_k1", lambda x: sg.top_k(x, 1), lambda x: jax.lax.top_k(x, 1),
             lambda x: jax.lax.top_k(x, 1), xs, (jl, el)),
            ("top_k8", lambda x: sg.top_k(x, 8), lambda x: jax.lax.top_k(x, 8), None, xs, (jl,)),
            ("soft_rank_l2", soft, hard_rank, jax.jit(hard_rank), xs, (jl, el)),
            ("soft_rank_l2 fwd+bwd", jax.grad(lambda x, w: (soft(x) * w).sum()),
             jax.grad(lambda x, w: (jnp.sort(x) * w).sum()), None, xws, (jl,)),
        ]
        for label, sg_fn, ref_fn, eager_ref, args, modes in ops:
            for mode in (m for m in modes if m in which):
                case = f"per_call/{label}/{mode}"
                if not self.selected(case):
                    continue
                if self.over_budget():
                    self.skip(case)
                    continue
                eager = mode == el
                f_sg = sg_fn if eager else jax.jit(sg_fn)
                f_ref = eager_ref if eager else jax.jit(ref_fn)
                impls = [self.jax_impl("sortgrad", f_sg, args, sortgrad=True),
                         self.jax_impl("jnp", f_ref, args)]
                try:
                    for impl in impls:
                        impl.sync(impl.call(0))
                    rounds = time_interleaved(impls, **self.timing_options(mode != jt,
                                                                           tiny=True))
                except Exception as err:
                    self.error(case, "sortgrad/jnp", err)
                    continue
                a, b = (_stats(i.samples) for i in impls)
                rec = {"case": case, "op": label, "mode": mode, "n": TINY_N,
                       "sortgrad_us": a["median_us"], "jnp_us": b["median_us"],
                       "sortgrad_p25_us": a["p25_us"], "sortgrad_p75_us": a["p75_us"],
                       "jnp_p25_us": b["p25_us"], "jnp_p75_us": b["p75_us"],
                       "excess_us": a["median_us"] - b["median_us"], "rounds": rounds,
                       "calls_per_batch": [i.calls for i in impls],
                       "run_backend": self.args.backend}
                self.result["per_call"].append(rec)
                print(f"{case:<40} sortgrad {a['median_us']:8.1f} us  jnp {b['median_us']:8.1f}"
                      f" us  excess {rec['excess_us']:8.1f} us", flush=True)
        self.save()

    def skip(self, case):
        self.result["skipped"].append(case)
        self.result["budget_exhausted"] = True

    # .. hard ops
    def hard(self, shape_str, shape, op, k=None):
        jax, jnp, sg = self.jax, self.jnp, self.sg
        label = op if k is None else f"top_k{k}"
        case = f"{label}/{shape_str}"
        if not self.selected(case):
            return
        if self.over_budget():
            self.skip(case)
            return
        rot = self.rotation(shape)
        args = [(x,) for x in rot["x"]]
        n = shape[-1]
        if op == "sort":
            f_sg, f_ref, ref_name, min_bytes = jax.jit(sg.sort), jax.jit(jnp.sort), "jnp.sort", 8
        elif op == "argsort":
            f_sg = jax.jit(sg.argsort)
            f_ref = jax.jit(lambda x: jnp.argsort(x, stable=True))
            ref_name, min_bytes = "jnp.argsort(stable)", 8
        else:
            f_sg = jax.jit(lambda x: sg.top_k(x, k))
            f_ref = jax.jit(lambda x: jax.lax.top_k(x, k))
            ref_name, min_bytes = "lax.top_k", 4 + 8 * k / n
        impls = [self.jax_impl("sortgrad", f_sg, args, sortgrad=True),
                 self.jax_impl(ref_name, f_ref, args)]
        checks = {}
        try:
            want = jax.device_get(f_ref(rot["x"][0]))
        except Exception as err:
            self.error(case, ref_name, err)
            return
        try:
            got = jax.device_get(f_sg(rot["x"][0]))
        except Exception as err:
            self.error(case, "sortgrad", err)
            return
        if op == "top_k":
            ok = same_bits(got[0], want[0]) and same_bits(got[1], want[1])
        else:
            ok = same_bits(got, want)
        checks["sortgrad"] = {"agree": ok, "check": f"bit-identical to {ref_name}"}
        self.check_required(case, impls[0], checks["sortgrad"])
        rounds = time_interleaved(impls, **self.timing_options())
        self.record(case, label, "fwd", shape, impls, checks, rounds, rot,
                    min_bytes=min_bytes * int(np.prod(shape)))
        self.save()

    # .. soft ops
    def soft(self, shape_str, shape, op, reg, pass_):
        jax, sg = self.jax, self.sg
        label = f"{op}_{reg}"
        case = f"{label}/{pass_}/{shape_str}"
        if not self.selected(case):
            return
        if self.over_budget():
            self.skip(case)
            return
        rot = self.rotation(shape)
        n = shape[-1]
        sg_op = getattr(sg, op)

        def fwd(x):
            return sg_op(x, regularization_strength=EPS, regularization=reg)

        def loss(x, w):
            return (fwd(x) * w).sum()
        fn = fwd if pass_ == "fwd" else jax.grad(loss)
        args = [(x,) if pass_ == "fwd" else (x, rot["w"]) for x in rot["x"]]
        impls, outs, checks = [], {}, {}

        def add(impl):
            """Runs impl once (compiles it; its output is checked) and keeps it for timing."""
            try:
                out = impl.call(0)
                impl.sync(out)
                outs[impl.name] = impl.to_numpy(out)
            except Exception as err:
                self.error(case, impl.name, err)
                return False
            impls.append(impl)
            return True

        if not add(self.jax_impl("sortgrad", jax.jit(fn), args, sortgrad=True)):
            return
        x0 = rot["x_host"][0]
        checks["sortgrad"] = soft_invariants(op, reg, pass_, outs["sortgrad"], x0, n)
        self.check_required(case, impls[0], checks["sortgrad"])

        # sortgrad's host path: lowered and compiled inside callback_mode("pure") (the mode is
        # read when the function is traced; the compiled executable keeps it)
        host = HOST_NAME
        mode_ctx = getattr(sg, "callback_mode", None)
        if self.args.no_host:
            pass
        elif mode_ctx is None:
            self.note(f"{case}: sortgrad.callback_mode missing, host path skipped")
        elif int(np.prod(shape)) > self.args.host_max_elements:
            self.result.setdefault("host_path_skipped", []).append(case)
        else:
            try:
                with mode_ctx("pure"):
                    compiled = jax.jit(fn).lower(*args[0]).compile()
            except Exception as err:
                self.error(case, host, err)
            else:
                add(self.jax_impl(host, compiled, args, sortgrad=True, required=False))
        if host in outs:
            c = {"finite": bool(np.isfinite(outs[host]).all())}
            if pass_ == "fwd":
                err = rel_err(outs["sortgrad"], outs[host])
                required = reg == "l2"
                c.update(max_rel_err=err, agree=bool(err is not None and err <= SOFT_TOL_L2),
                         check=f"device vs host rel<={SOFT_TOL_L2:g} "
                         + ("(required)" if required else "(recorded)"))
                if required:
                    checks["sortgrad"]["vs_host"] = c
                    checks["sortgrad"]["agree"] = bool(checks["sortgrad"]["agree"] and c["agree"])
                    if not c["agree"]:
                        self.result["failed_checks"].append(f"{case} sortgrad vs host: {c}")
            else:
                err = rel_err(tie_group_mean(outs["sortgrad"], x0, rows=32),
                              tie_group_mean(outs[host], x0, rows=32))
                c.update(max_rel_err_tie_mean=err, agree=bool(err is not None and err <= 1e-3),
                         check="gradient vs host on 32 rows after tie averaging (recorded)")
            checks[host] = c

        # torchsort on the same device
        if self.torchsort is not None:
            impl = self.torch_impl(op, reg, pass_, rot)
            if add(impl):
                a, b = outs["sortgrad"], outs[impl.name]
                err = (rel_err(a, b) if pass_ == "fwd"
                       else rel_err(tie_group_mean(a, x0, rows=32),
                                    tie_group_mean(b, x0, rows=32)))
                checks[impl.name] = {"max_rel_err": err,
                                     "agree": bool(err is not None and err <= 1e-3),
                                     "check": "vs sortgrad rel<=1e-3"
                                     + (" (32 rows, tie averaged)" if pass_ != "fwd" else "")
                                     + " (recorded only)"}
        # pure-JAX soft ranks (an n x n matrix per row): only where that is small enough
        if op == "soft_rank" and reg == "l2":
            for name, peer in self.peers.items():
                need = shape[0] * n * n * 4
                if need > self.args.peer_max_bytes:
                    self.note(f"{case}: {name} skipped (n x n per row: {need / 2**30:.2f} GiB "
                              "> --peer-max-bytes)")
                    continue
                pfn = peer if pass_ == "fwd" else jax.grad(lambda x, w, p=peer: (p(x) * w).sum())
                if add(self.jax_impl(name, jax.jit(pfn), args, required=False,
                                     note="entropic-OT / pairwise soft rank: another function")):
                    checks[name] = {"finite": bool(np.isfinite(outs[name]).all()),
                                    "agree": None, "check": "recorded only (another function)"}
        try:
            rounds = time_interleaved(impls, **self.timing_options())
        except Exception as err:
            self.error(case, "timing", err)
            return
        self.record(case, label, pass_, shape, impls, checks, rounds, rot,
                    min_bytes=8 * int(np.prod(shape)) if pass_ == "fwd" else None)
        self.save()

    def torch_impl(self, op, reg, pass_, rot):
        """torchsort on the same inputs (copied to torch's device once, untimed)."""
        torch, ts_op, dev = self.torch, getattr(self.torchsort, op), self.torch_device
        xt = [torch.as_tensor(h, device=dev) for h in rot["x_host"]]
        wt = torch.as_tensor(rot["w_host"], device=dev)
        if pass_ == "fwd":
            def call(i):
                with torch.no_grad():
                    return ts_op(xt[i % len(xt)], regularization=reg,
                                 regularization_strength=EPS)
        else:
            leaves = [t.clone().requires_grad_(True) for t in xt]

            def call(i):
                x = leaves[i % len(leaves)]
                x.grad = None
                (ts_op(x, regularization=reg, regularization_strength=EPS) * wt).sum().backward()
                return x.grad

        def sync(_outputs):
            if dev == "cuda":
                torch.cuda.synchronize()
        impl = Impl(f"torchsort ({dev})", call, sync, period=len(xt), required=False)
        impl.to_numpy = lambda out: out.detach().cpu().numpy()
        return impl

    # .. targets
    def targets(self):
        return evaluate_targets(self.result["records"], self.result["per_call"],
                                self.result["skipped"], self.args.smoke, self.args.backend)

    # .. the run
    def run(self):
        a = self.args
        shapes = SMOKE_SHAPES if a.smoke else SHAPES
        if a.shapes:
            shapes = {s: parse_shape(s) for s in a.shapes.split(",")}
        soft_first = TARGET_SOFT_SHAPE if TARGET_SOFT_SHAPE in shapes else next(iter(shapes))
        hard_first = [s for s in shapes if s in TARGET_HARD_SHAPES] or list(shapes)[:1]
        soft_cases = [(op, reg, p) for op in SOFT_OPS for reg in REGS for p in ("fwd+bwd", "fwd")]
        hard_cases = [("sort", None), ("argsort", None)] + [("top_k", k) for k in TOP_KS]

        def hard_all(shape_str):
            shape = shapes[shape_str]
            for op, k in hard_cases:
                if k is None or k <= shape[-1]:
                    self.guard(lambda op=op, k=k: self.hard(shape_str, shape, op, k),
                               f"{op}{k or ''}/{shape_str}")
            done.add(("hard", shape_str))

        def soft_all(shape_str, only=None):
            shape = shapes[shape_str]
            for op, reg, p in soft_cases:
                if (only is None or (op, reg, p) in only) and (op, reg, p, shape_str) not in done:
                    self.guard(lambda op=op, reg=reg, p=p: self.soft(shape_str, shape, op, reg, p),
                               f"{op}_{reg}/{p}/{shape_str}")
                    done.add((op, reg, p, shape_str))

        done: set = set()
        self.guard(self.copy_bandwidth, "copy_bandwidth")
        # the cases that carry a target first (per-call latency, soft_rank fwd+bwd at
        # 4096x1024, the hard ops at 2^24), then everything else
        if not a.no_per_call:
            self.guard(lambda: self.per_call(("jit-latency",)), "per_call")
        soft_first_cases = {("soft_rank", "l2", "fwd+bwd"), ("soft_rank", "kl", "fwd+bwd")}
        soft_all(soft_first, soft_first_cases)
        for shape_str in hard_first:
            hard_all(shape_str)
        if not a.no_per_call:
            self.guard(lambda: self.per_call(("eager-latency", "jit-throughput")), "per_call")
        soft_all(soft_first)
        for shape_str in shapes:
            if ("hard", shape_str) not in done:
                hard_all(shape_str)
            soft_all(shape_str)
        self.inputs.clear()
        self.save()

    def guard(self, fn, what):
        try:
            fn()
        except Exception as err:  # one failing case must not stop the others
            import traceback
            self.error(what, "case", err)
            self.result["errors"].append("Traceback " + traceback.format_exc()[-1500:])


def evaluate_targets(records, per_call, skipped, smoke, backend):
    """The issue's targets from the records of one run (one backend); met: True / False /
    None (not measured: "why" says whether the budget or a missing peer is the reason)."""
    out = []
    soft_shape = next(iter(SMOKE_SHAPES)) if smoke else TARGET_SOFT_SHAPE
    hard_shapes = tuple(SMOKE_SHAPES) if smoke else TARGET_HARD_SHAPES

    def target(text, value, unit, threshold, met, why=None):
        out.append({"target": text, "backend": backend, "value": value, "unit": unit,
                    "threshold": threshold, "met": met, "why": why})

    for reg in REGS:
        case = f"soft_rank_{reg}/fwd+bwd/{soft_shape}"
        for prefix, what in (("sortgrad host path", "sortgrad's host path"),
                             ("torchsort", "torchsort")):
            hit = [r for r in records if r["case"] == case and r["impl"].startswith(prefix)]
            value = hit[0].get("speedup_of_sortgrad") if hit else None
            why = None if hit else ("budget" if case in skipped else "not measured")
            target(f"{case}: >= {SOFT_SPEEDUP_TARGET:g}x faster than {what}", value, "speedup",
                   SOFT_SPEEDUP_TARGET, None if value is None else value >= SOFT_SPEEDUP_TARGET,
                   why)
    for shape_str in hard_shapes:
        for label in ("sort", "argsort") + tuple(f"top_k{k}" for k in TOP_KS):
            case = f"{label}/{shape_str}"
            hit = [r for r in records if r["case"] == case and not r["sortgrad"]]
            if not hit and case not in skipped:
                continue  # k > n, not selected, or an error (in "errors")
            value = hit[0].get("ratio_sortgrad_over_impl") if hit else None
            target(f"{case}: no slower than {hit[0]['impl'] if hit else 'XLA'}", value,
                   "time ratio", 1.0, None if value is None else value <= 1.0,
                   None if hit else "budget")
    for rec in per_call:
        if rec["mode"] != "jit-throughput":
            target(f"{rec['case']}: <= {PER_CALL_TARGET_US:g} us over the jnp op",
                   rec["excess_us"], "us", PER_CALL_TARGET_US,
                   rec["excess_us"] <= PER_CALL_TARGET_US)
    return out


def print_targets(targets):
    print("\ntargets (met: yes / NO / n/a = not measured):")
    for t in targets:
        v = t["value"]
        shown = "n/a" if v is None else (f"{v:.2f}x" if t["unit"] == "speedup" else
                                         f"{v:.1f} us" if t["unit"] == "us" else f"{v:.3f}")
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        why = f"  ({t['why']})" if t.get("why") else ""
        print(f"  {met:>3}  {shown:>10}  [{t['backend']}] {t['target']}{why}")


# --- entry points ---------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, a few seconds; also on CPU-only JAX (CI)")
    p.add_argument("--backend", choices=("cupy", "numba", "both"), default="cupy",
                   help="sortgrad's GPU kernel backend (default cupy)")
    p.add_argument("--out", default=None, help="JSON path (default: perf/results/"
                   "jax-gpu-<device>-<backend>.json; --smoke writes nothing without --out)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop adding cases after this many seconds (the JSON says so)")
    p.add_argument("--only", default="*", help="comma-separated fnmatch patterns of case names, "
                   "e.g. 'soft_rank_l2/*,sort/*,per_call/*'")
    p.add_argument("--shapes", default=None, help="comma-separated RxN shapes instead of the "
                   "default ones")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (7; smoke 3)")
    p.add_argument("--batch-ms", type=float, default=None,
                   help="target duration of one timed batch (40 ms; smoke 2 ms)")
    p.add_argument("--case-max-s", type=float, default=None,
                   help="fewer rounds (at least 3) for cases that would take longer (8 s; "
                   "smoke 1 s)")
    p.add_argument("--host-max-elements", type=int, default=1 << 22,
                   help="run sortgrad's host path only up to this many elements (2^22: the "
                   "4096x1024 and 16x65536 shapes)")
    p.add_argument("--peer-max-bytes", type=float, default=float(1 << 30),
                   help="largest n x n-per-row matrix a pure-JAX peer may need (1 GiB)")
    p.add_argument("--no-host", action="store_true", help="skip sortgrad's host path")
    p.add_argument("--no-peers", action="store_true", help="skip torchsort / OTT / softjax")
    p.add_argument("--no-per-call", action="store_true", help="skip the 8-element case")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run the full (non-smoke) mode on a CPU device (to test this script)")
    return p


def _default_out(result, backend, smoke):
    tag = device_tag(result["environment"].get("device", "device"))
    return RESULTS / f"jax-gpu-{tag}-{backend}{'-smoke' if smoke else ''}.json"


def _record_warnings(bench):
    """Python warnings (e.g. sortgrad's 'runs its JAX ops on the host' fallback) go into the
    JSON ("warnings", each text once) as well as to stderr."""
    import warnings
    seen = bench.result.setdefault("warnings", [])
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message}"[:500]
        if text not in seen:
            seen.append(text)
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show


def run_one(args) -> int:
    # the env var must be set before sortgrad is imported (read at import, if at all)
    os.environ["SORTGRAD_GPU_BACKEND"] = args.backend
    import jax
    platform_name = jax.devices()[0].platform
    if platform_name not in ("gpu", "cuda") and not (args.smoke or args.allow_cpu):
        print(f"bench_jax_gpu: JAX's default device is {platform_name!r}, not a GPU; run with "
              "--smoke for the CPU check. Nothing was measured.", file=sys.stderr)
        return 2
    bench = Bench(args)
    _record_warnings(bench)
    if args.out is None and not args.smoke:
        args.out = str(_default_out(bench.result, args.backend, args.smoke))
    env = bench.result["environment"]
    print(f"bench_jax_gpu: {env['device']} ({env['jax_platform']}), jax "
          f"{env['versions']['jax_runtime']}, backend {args.backend} "
          f"(set_gpu_backend: {bench.gpu_backend.get('set', 'missing')}), L2 "
          f"{bench.l2_bytes / 2**20:.0f} MiB ({bench.result['l2_source']})", flush=True)
    code = 0
    try:
        bench.run()
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep what was measured
        bench.result["interrupted"] = True
        bench.note("interrupted (SIGINT): the JSON holds the cases finished before")
        code = 130
    finally:
        bench.save()
    res = bench.result
    if res["budget_exhausted"]:
        print(f"budget of {args.budget_s} s exhausted: {len(res['skipped'])} cases skipped")
    print_targets(res["targets"])
    if args.out:
        print(f"wrote {args.out}")
    sys.stdout.flush()
    if res["failed_checks"]:
        print("FAILED checks:\n  " + "\n  ".join(res["failed_checks"]), file=sys.stderr)
        return 1
    return code


def run_both(args, argv) -> int:
    """Each backend in its own process (a traced function keeps its backend); merged JSON."""
    os.environ["SORTGRAD_GPU_BACKEND"] = "cupy"
    try:
        import sortgrad
        has_setter = hasattr(sortgrad, "set_gpu_backend")
    except Exception as err:
        print(f"sortgrad does not import: {err!r}", file=sys.stderr)
        return 1
    backends = ["cupy", "numba"] if has_setter else ["cupy"]
    notes = [] if has_setter else [("sortgrad.set_gpu_backend does not exist: only the "
                                    "default (cupy) run was made")]
    t0 = time.monotonic()
    strip = {"--backend", "--out", "--budget-s"}
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in strip:
            skip = "=" not in item
            continue
        rest.append(item)
    runs, codes, interrupted = [], [], False
    merged_out = args.out
    tmpdir = Path(os.environ.get("TMPDIR", "/tmp"))
    weights = {"cupy": 0.7, "numba": 0.3}  # the default backend gets most of a budget
    for i, backend in enumerate(backends):
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--backend", backend]
        if args.budget_s is not None:
            left = args.budget_s - (time.monotonic() - t0)
            share = left * weights[backend] / sum(weights[b] for b in backends[i:])
            cmd += ["--budget-s", f"{max(share, 1.0):.1f}"]
        out = tmpdir / f"bench_jax_gpu_{os.getpid()}_{backend}.json"
        cmd += ["--out", str(out)]
        print(f"=== backend {backend}: {' '.join(cmd[2:])}", flush=True)
        child = subprocess.Popen(cmd)
        try:
            codes.append(child.wait())
        except KeyboardInterrupt:  # the child got the signal too (same process group)
            interrupted = True
            try:
                codes.append(child.wait(timeout=20))
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                child.kill()
                codes.append(child.wait())
        try:
            runs.append(json.loads(out.read_text()))
            out.unlink()
        except Exception as err:
            notes.append(f"backend {backend}: no JSON ({err!r}), exit {codes[-1]}")
        if interrupted:
            notes.append("interrupted (SIGINT): later backends not run")
        merged = _merge(args, argv, runs, backends, codes, notes, interrupted)
        if merged_out is None and runs and not args.smoke:
            merged_out = str(_default_out(runs[0], "both", False))
        if merged_out:  # after every backend: a later kill keeps the earlier runs
            write_json(merged_out, merged)
        if interrupted:
            break
    if merged_out:
        print(f"wrote {merged_out}")
    print_targets(merged["targets"])
    if any(c == 2 for c in codes) and not runs:
        return 2
    if merged["failed_checks"] or any(c == 1 for c in codes):
        return 1
    return 130 if interrupted else max(codes, default=0)


def _merge(args, argv, runs, backends, codes, notes, interrupted) -> dict:
    """One JSON of several single-backend runs: records, per-call results, targets, checks
    and errors concatenated (each record carries its run_backend); per-run metadata in
    "runs"."""
    merged = {"tool": "perf/bench_jax_gpu.py", "argv": argv, "backend_requested": "both",
              "backends": backends, "smoke": bool(args.smoke), "notes": list(notes),
              "exit_codes": dict(zip(backends, codes)), "interrupted": interrupted,
              "timer": TIMER}
    for key in ("records", "per_call", "targets", "failed_checks", "skipped", "errors"):
        merged[key] = [item for run in runs for item in run.get(key, [])]
    merged["budget_exhausted"] = any(run.get("budget_exhausted") for run in runs)
    merged["runs"] = [{k: v for k, v in run.items() if k not in ("records", "per_call",
                                                                  "targets")} for run in runs]
    if runs:
        for key in ("environment", "started", "copy_bandwidth_GBps", "l2_bytes_used",
                    "l2_source"):
            merged[key] = runs[0].get(key)
        merged["finished"] = runs[-1].get("finished")
    return merged


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    smoke = args.smoke
    args.rounds = args.rounds or (3 if smoke else 7)
    args.batch_ms = args.batch_ms or (2.0 if smoke else 40.0)
    args.case_max_s = args.case_max_s or (1.0 if smoke else 8.0)
    if args.backend == "both":
        return run_both(args, argv)
    return run_one(args)


if __name__ == "__main__":
    sys.exit(main())
