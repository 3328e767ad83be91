"""CPU benchmark: sortgrad's JAX ops against jnp / jax.lax, NumPy and torchsort.

What it times (float32 and float64, each shape in SHAPES, the last axis is the sorted one):
  soft ops   sortgrad.soft_rank / soft_sort, regularization "l2" and "kl", strength 1.0,
             forward ("fwd") and forward+backward ("fwd+bwd": jit(grad((op(x) * w).sum())),
             against torchsort.soft_rank / soft_sort (forward; and torch autograd
             (op(x) * w).sum().backward()), same data, same dtype.
  hard ops   sortgrad.sort (fwd and fwd+bwd), argsort, top_k(x, 16) against jnp.sort,
             jnp.argsort(stable=True), jax.lax.top_k (all jitted) and NumPy (np.sort,
             np.argsort(kind="stable"), top-k by np.argpartition + sort).
  overhead   one call of sortgrad.sort vs jnp.sort vs a jitted `x + 1` on 8 elements (us).

Before timing, results are checked: hard ops exactly against every baseline, soft ops against
torchsort run in float64 on the same values (forward and gradient, max |a - b| / max |b|;
the distance to torchsort in the benchmarked dtype is recorded too: torchsort computes in that
dtype, sortgrad in float64). The outcome is a field of every baseline record ("agree",
"max_rel_err"); a failed check that must hold (hard ops; soft ops with "l2") makes the script
exit with status 1 after writing the JSON. KL checks are recorded
only (conventions of KL implementations differ: DESIGN.md section 4 notes that fast-soft-sort's
soft_sort KL gradient uses the softmax of rho/eps; torchsort 0.1.10 uses the softmax of the
sorted inputs, as sortgrad does, and agrees). Gradients are compared after averaging over groups
of exactly tied inputs (float32 data has ties; see `tie_group_mean`). An untimed check at
strengths 0.1, 1 and 100 ("convention_checks" in the JSON) covers the case where soft_sort
really pools: at strength 1 on standard-normal data soft_sort equals the hard sort.

Timing: warm-up calls (jit compilation, Numba compilation/caching) first, then `--repeats`
single calls, each timed with time.perf_counter around the call plus block_until_ready for
JAX (torch and NumPy run synchronously). Reported: median and IQR in ms, elements/s, and for
baselines the ratio sortgrad / baseline (> 1: sortgrad is slower).

  python perf/bench_cpu.py                      # full run -> perf/results/cpu-<host>.json
  python perf/bench_cpu.py --smoke              # tiny sizes, a few seconds (CI)
  python perf/bench_cpu.py --only 'soft_rank*' --shapes 1024x1000 --dtypes float32

Soft ops are timed in interleaved rounds (`--rounds`, default 5): each round times sortgrad
fwd, torchsort fwd, sortgrad fwd+bwd, torchsort fwd+bwd in turn, so drifting load on a shared
machine hits both sides alike; medians over all rounds, and the ratio of the medians.

Long rows and memory (issue 15):
  --long-rows        adds the shapes 1x1000000 and 1x4000000 to the soft-op cases
  --sweep            time per element of the soft ops' fwd+bwd on one row of 2^10 .. 2^22
                     elements ("sweep" records, ns per element, sortgrad and torchsort)
  --memory           peak extra memory of the soft ops' fwd+bwd (and torchsort's), one fresh
                     subprocess per case ("memory" records). Measured as the growth of the
                     process's resident set during the first call at full size: the inputs x
                     and w exist and the executable is compiled (and warmed on a tiny shape:
                     Numba / XLA code loaded) before; then /proc/self/clear_refs resets the
                     high-water mark (VmHWM) to the current RSS, the call runs, and
                     VmHWM - VmRSS(before) is the peak extra memory: outputs, residuals and
                     temporaries, not the inputs. Reported in bytes and bytes per element.
                     Linux only.

Run it on an otherwise idle machine: the soft kernels use Numba's parallel threads, torch its
intra-op pool, XLA its own; anything else running skews all of them.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

# torch's OpenMP workers spin after each call by default and steal the second core from the
# sortgrad/JAX cases timed after them; passive waiting keeps the cases independent.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PERF = Path(__file__).resolve().parent
if str(PERF) not in sys.path:  # perf/_common.py, also when this file is not run as a script
    sys.path.insert(0, str(PERF))

from _common import (RESULTS, cpu_environment, format_shape, host_tag, loadavg,  # noqa: E402
                     parse_shape, selected, tie_group_mean, timing_stats, usable_cores,
                     write_json)

import numpy as np  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64 runs; explicit dtypes everywhere else

import jax.numpy as jnp  # noqa: E402

SHAPES = [(1024, 1000), (128, 1000), (1024, 100), (1, 100000)]
LONG_SHAPES = [(1, 1000000), (1, 4000000)]  # --long-rows
SWEEP_LOG2 = range(10, 23)  # --sweep: one row of 2^10 .. 2^22 elements
MEMORY_SHAPES = [(1024, 100000), (1, 4000000)]  # --memory (float32, and --dtypes)
SMOKE_SHAPES = [(16, 100), (1, 2000)]
DTYPES = ["float32", "float64"]
TOP_K = 16
EPS = 1.0
SOFT_OPS = ["soft_rank", "soft_sort"]
REGULARIZATIONS = ["l2", "kl"]
HARD_OPS = ["sort", "argsort", "top_k"]
# relative tolerance of the soft-op agreement check (max |a - b| / max |b|)
SOFT_TOL = {"float32": 1e-4, "float64": 1e-9}


# --- optional libraries ---------------------------------------------------------------------

def load_torch(threads: int):
    """(torch, torchsort, threads) or Nones when they are not installed."""
    try:
        import torch
    except Exception:
        return None, None, None
    torch.set_num_threads(threads)
    try:
        import torchsort
    except Exception:
        torchsort = None
    return torch, torchsort, torch.get_num_threads()


def load_sortgrad():
    """The sortgrad module, or None (with a message) when the public ops are not there yet."""
    try:
        import sortgrad
    except Exception as e:
        print(f"! sortgrad does not import: {e!r}", file=sys.stderr)
        return None
    missing = [name for name in ("sort", "argsort", "top_k", "soft_rank", "soft_sort")
               if not hasattr(sortgrad, name)]
    if missing:
        print(f"! sortgrad lacks {missing}; those benchmarks are skipped", file=sys.stderr)
    return sortgrad


# --- timing ---------------------------------------------------------------------------------

def measure(call, repeats: int, warmup: int, max_seconds: float) -> dict:
    """Times `call()` (which must block until its result is ready) `repeats` times."""
    for _ in range(warmup):
        call()
    times = []
    budget_end = time.perf_counter() + max_seconds
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collector pauses inside timed calls (main() collects between cases)
    try:
        for i in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
            if i >= 4 and time.perf_counter() > budget_end:
                break  # keep long cases bounded; at least 5 samples
    finally:
        if gc_was_enabled:
            gc.enable()
    return timing_stats(np.asarray(times) * 1e3, unit="ms", count_key="samples", iqr=True)


def measure_rounds(calls: dict, rounds: int, repeats: int, warmup: int,
                   max_seconds: float) -> dict:
    """Times each `calls[name]()` in `rounds` interleaved rounds (in each round every call
    runs its share of `repeats` in turn); {name: timing stats over all its samples}. A case
    stops after `max_seconds` per call once every call has 5 samples."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples = {name: [] for name in calls}
    per_round = max(1, -(-repeats // rounds))
    budget_end = time.perf_counter() + max_seconds * len(calls)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, call in calls.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    call()
                    samples[name].append(time.perf_counter() - t0)
            if (min(len(v) for v in samples.values()) >= 5
                    and time.perf_counter() > budget_end):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {**timing_stats(np.asarray(v) * 1e3, unit="ms", count_key="samples",
                                  iqr=True), "rounds": rounds}
            for name, v in samples.items()}


def _block(out):
    return jax.block_until_ready(out)


# --- agreement ------------------------------------------------------------------------------

def tied_elements(x) -> int:
    x = np.asarray(x)
    s = np.sort(x.reshape(-1, x.shape[-1]), axis=-1)
    eq = s[:, 1:] == s[:, :-1]
    return int(eq.sum())


def exact(a, b) -> dict:
    a, b = np.asarray(a), np.asarray(b)
    ok = a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    mismatches = None
    if a.shape == b.shape and not ok:
        mismatches = int(np.sum(~((a == b) | (np.isnan(a) & np.isnan(b))
                                  if a.dtype.kind == "f" else a == b)))
    return {"agree": ok, "check": "exact", "mismatches": mismatches}


def close(a, b, tol: float) -> dict:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return {"agree": False, "check": f"rel<={tol:g}", "max_rel_err": None,
                "note": f"shape {a.shape} vs {b.shape}"}
    scale = max(float(np.max(np.abs(b))), np.finfo(np.float64).tiny) if b.size else 1.0
    err = float(np.max(np.abs(a - b))) / scale if a.size else 0.0
    ok = bool(np.isfinite(err) and err <= tol)
    return {"agree": ok, "check": f"rel<={tol:g}", "max_rel_err": err}


# --- benchmark cases ------------------------------------------------------------------------

class Bench:
    def __init__(self, args, sortgrad, torch, torchsort):
        self.args = args
        self.sg = sortgrad
        self.torch = torch
        self.torchsort = torchsort
        self.records: list[dict] = []
        self.failures: list[str] = []
        self.notes: list[str] = []

    # .. helpers
    def selected(self, label: str) -> bool:
        return selected(label, self.args.only)

    def has(self, name: str) -> bool:
        return self.sg is not None and hasattr(self.sg, name)

    def time(self, call) -> dict:
        a = self.args
        return measure(call, a.repeats, a.warmup, a.max_seconds)

    def add(self, *, op, label, variant, pass_, shape, dtype, impl, timing, check=None,
            required=True):
        n = int(np.prod(shape))
        rec = {"op": op, "label": label, "variant": variant, "pass": pass_,
               "shape": list(shape), "shape_str": format_shape(shape), "dtype": dtype,
               "impl": impl, "n_elements": n, **timing,
               "elements_per_s": n / (timing["median_ms"] * 1e-3)}
        if check is not None:
            rec.update({k: v for k, v in check.items()})
            rec["check_required"] = required
            if required and not check["agree"]:
                self.failures.append(f"{label} {pass_} {rec['shape_str']} {dtype}: "
                                     f"sortgrad vs {impl}: {check}")
        self.records.append(rec)
        self._progress(rec)
        return rec

    def _progress(self, r):
        extra = ""
        if "agree" in r:
            extra = " agree" if r["agree"] else " DISAGREE"
            if r.get("max_rel_err") is not None:
                extra += f" (rel {r['max_rel_err']:.1e}"
                if r.get("max_rel_err_same_dtype") is not None and r["dtype"] != "float64":
                    extra += f"; vs same-dtype torchsort {r['max_rel_err_same_dtype']:.1e}"
                extra += ")"
        print(f"  {r['label']:<14} {r['pass']:<7} {r['shape_str']:>10} {r['dtype']:<7} "
              f"{r['impl']:<22} {r['median_ms']:9.3f} ms  iqr {r['iqr_ms']:.3f}{extra}",
              file=sys.stderr, flush=True)

    def link_ratios(self):
        """For each baseline record: ratio = sortgrad median / baseline median."""
        by_key = {}
        timed = [r for r in self.records if r["op"] != "memory"]
        for r in timed:
            if r["impl"].startswith("sortgrad"):
                by_key[(r["op"], r["label"], r["pass"], r["shape_str"], r["dtype"])] = r
        for r in self.records:  # memory: ratio of the peak extra bytes
            if r["op"] == "memory" and r["impl"] == "torchsort":
                sg = next((m for m in self.records if m["op"] == "memory"
                           and m["impl"] == "sortgrad" and m["label"] == r["label"]
                           and m["shape_str"] == r["shape_str"] and m["dtype"] == r["dtype"]),
                          None)
                if sg and sg.get("peak_extra_bytes") and r.get("peak_extra_bytes"):
                    r["ratio_sortgrad_over_baseline"] = (sg["peak_extra_bytes"]
                                                         / r["peak_extra_bytes"])
        for r in timed:
            sg = by_key.get((r["op"], r["label"], r["pass"], r["shape_str"], r["dtype"]))
            if r["impl"].startswith("sortgrad"):
                r["ratio_sortgrad_over_baseline"] = None
            elif sg is not None:
                r["sortgrad_median_ms"] = sg["median_ms"]
                r["ratio_sortgrad_over_baseline"] = sg["median_ms"] / r["median_ms"]

    # .. soft ops
    def soft(self, x_np, w_np, shape, dtype):
        torch, ts = self.torch, self.torchsort
        for op in SOFT_OPS:
            for reg in REGULARIZATIONS:
                label = f"{op}_{reg}"
                if not self.selected(label):
                    continue
                if not self.has(op):
                    self.notes.append(f"{label}: sortgrad.{op} missing, skipped")
                    continue
                sg_op = getattr(self.sg, op)

                def sg_fn(x, sg_op=sg_op, reg=reg):
                    return sg_op(x, regularization_strength=EPS, regularization=reg)

                fwd = jax.jit(sg_fn)
                grad = jax.jit(jax.grad(lambda x, w, f=sg_fn: (f(x) * w).sum()))
                x, w = jnp.asarray(x_np), jnp.asarray(w_np)
                y_sg = np.asarray(_block(fwd(x)))
                g_sg = np.asarray(_block(grad(x, w)))
                calls = {"sortgrad fwd": lambda: _block(fwd(x)),
                         "sortgrad fwd+bwd": lambda: _block(grad(x, w))}
                common = dict(op=op, label=label, variant=reg, shape=shape, dtype=dtype)
                checks = {}
                if ts is not None:
                    ts_op = getattr(ts, op)
                    xt = torch.from_numpy(x_np.copy())
                    wt = torch.from_numpy(w_np.copy())
                    xg = xt.clone().requires_grad_(True)

                    def t_forward(ts_op=ts_op, reg=reg, xt=xt):
                        with torch.no_grad():
                            return ts_op(xt, regularization=reg, regularization_strength=EPS)

                    def t_backward(ts_op=ts_op, reg=reg, xg=xg, wt=wt):
                        xg.grad = None
                        (ts_op(xg, regularization=reg, regularization_strength=EPS)
                         * wt).sum().backward()
                        return xg.grad

                    checks = self._soft_checks(ts_op, reg, x_np, w_np, dtype, y_sg, g_sg,
                                               t_forward().numpy(), t_backward().numpy())
                    calls = {"sortgrad fwd": calls["sortgrad fwd"], "torchsort fwd": t_forward,
                             "sortgrad fwd+bwd": calls["sortgrad fwd+bwd"],
                             "torchsort fwd+bwd": t_backward}
                a = self.args
                timings = measure_rounds(calls, a.rounds, a.repeats, a.warmup, a.max_seconds)
                for name, timing in timings.items():
                    impl, pass_ = name.split(" ")
                    self.add(**common, pass_=pass_, impl=impl, timing=timing,
                             check=checks.get(pass_) if impl == "torchsort" else None,
                             required=reg == "l2")

    def _soft_checks(self, ts_op, reg, x_np, w_np, dtype, y_sg, g_sg, y_ts, g_ts):
        """{"fwd": check, "fwd+bwd": check} of sortgrad against torchsort (see the module
        docstring)."""
        torch = self.torch
        # The reference is torchsort in float64 on the same input values: sortgrad
        # computes soft ops in float64 internally, torchsort in the input dtype, and
        # torchsort's float32 KL soft_rank gradient is off by up to ~10% of max|g|
        # at 128x1000 (float32 cancellation), so a float32 reference would flag
        # torchsort's error as ours. Same-dtype agreement is recorded as well.
        if dtype == "float64":
            y_ref, g_ref = y_ts, g_ts
        else:
            y_ref, g_ref = _torchsort_f64(torch, ts_op, reg, x_np, w_np)
        tol = SOFT_TOL[dtype]
        # hard requirement: L2 values and gradients; KL recorded only
        chk_f = close(y_sg, y_ref, tol)
        chk_f["reference"] = "torchsort float64"
        chk_f["max_rel_err_same_dtype"] = close(y_sg, y_ts, tol)["max_rel_err"]
        ties = tied_elements(x_np)
        g_sg_t, g_ref_t = tie_group_mean(g_sg, x_np), tie_group_mean(g_ref, x_np)
        chk_b = close(g_sg_t, g_ref_t, tol)
        chk_b["reference"] = "torchsort float64"
        chk_b["max_rel_err_same_dtype"] = close(
            g_sg_t, tie_group_mean(g_ts, x_np), tol)["max_rel_err"]
        chk_b["tied_pairs"] = ties
        if ties:
            chk_b["max_rel_err_raw"] = close(g_sg, g_ref, tol)["max_rel_err"]
            chk_b["check"] += " (gradients averaged over groups of tied inputs)"
        return {"fwd": chk_f, "fwd+bwd": chk_b}

    # .. long-row sweep: time per element of fwd+bwd on one row
    def sweep(self, dtypes):
        """fwd+bwd of each selected soft op on one row of 2^k elements (SWEEP_LOG2), sortgrad
        and torchsort interleaved; records with op "sweep" and ns_per_element."""
        torch, ts = self.torch, self.torchsort
        a = self.args
        rng = np.random.default_rng(a.seed + 1)
        for log2 in (range(10, 12) if a.smoke else SWEEP_LOG2):
            n = 1 << log2
            base_x, base_w = rng.standard_normal((1, n)), rng.standard_normal((1, n))
            for dtype in dtypes:
                gc.collect()
                x_np, w_np = base_x.astype(dtype), base_w.astype(dtype)
                x, w = jnp.asarray(x_np), jnp.asarray(w_np)
                for op in SOFT_OPS:
                    for reg in REGULARIZATIONS:
                        label = f"{op}_{reg}"
                        if not self.selected(label) or not self.has(op):
                            continue
                        sg_op = getattr(self.sg, op)
                        grad = jax.jit(jax.grad(lambda x, w, f=sg_op, reg=reg: (f(
                            x, regularization_strength=EPS, regularization=reg) * w).sum()))
                        calls = {"sortgrad": lambda grad=grad: _block(grad(x, w))}
                        if ts is not None:
                            xg = torch.from_numpy(x_np.copy()).requires_grad_(True)
                            wt = torch.from_numpy(w_np.copy())

                            def t_backward(ts_op=getattr(ts, op), reg=reg, xg=xg, wt=wt):
                                xg.grad = None
                                (ts_op(xg, regularization=reg, regularization_strength=EPS)
                                 * wt).sum().backward()
                            calls["torchsort"] = t_backward
                        repeats = max(5, min(a.repeats, int(2e7 / n)))
                        timings = measure_rounds(calls, a.rounds, repeats, a.warmup,
                                                 a.max_seconds)
                        for impl, t in timings.items():
                            t["ns_per_element"] = t["median_ms"] * 1e6 / n
                            self.add(op="sweep", label=label, variant=reg, pass_="fwd+bwd",
                                     shape=(1, n), dtype=dtype, impl=impl, timing=t)

    # .. peak memory, one subprocess per case
    def memory(self, shapes, dtypes):
        """Peak extra memory of fwd+bwd per soft op and shape (see the module docstring)."""
        impls = ["sortgrad"] + (["torchsort"] if self.torchsort is not None else [])
        for shape in shapes:
            for dtype in dtypes:
                for op in SOFT_OPS:
                    for reg in REGULARIZATIONS:
                        label = f"{op}_{reg}"
                        if not self.selected(label) or not self.has(op):
                            continue
                        for impl in impls:
                            rec = _memory_subprocess(impl, op, reg, shape, dtype)
                            rec.update(op="memory", label=label, variant=reg,
                                       **{"pass": "fwd+bwd"}, shape=list(shape),
                                       shape_str=format_shape(shape), dtype=dtype, impl=impl)
                            self.records.append(rec)
                            print(f"  memory {label:<13} {rec['shape_str']:>11} {dtype:<7} "
                                  f"{impl:<9} "
                                  + (f"{rec['peak_extra_bytes'] / 2**20:9.1f} MiB "
                                     f"{rec['bytes_per_element']:6.1f} B/elem"
                                     if rec.get("peak_extra_bytes") is not None
                                     else f"failed: {rec.get('error')}"),
                                  file=sys.stderr, flush=True)

    # .. conventions: sortgrad vs torchsort where the isotonic blocks really pool
    def conventions(self):
        """Untimed agreement of the soft ops with torchsort at several strengths (float64).

        At strength 1.0 on standard-normal data soft_sort barely pools (rho/eps has spacing 1,
        far above the gaps of sorted x: soft_sort is then exactly the hard sort), so the timed
        check cannot see where conventions could differ; eps = 100 makes real blocks. The KL
        soft_sort VJP is the interesting one: sortgrad takes the softmax of the sorted inputs
        within a block (DESIGN.md section 4, where fast-soft-sort is said to use rho/eps);
        torchsort 0.1.10 passes the sorted inputs to isotonic_kl_backward too, so all agree.
        """
        out = []
        if self.torchsort is None:
            return out
        torch, ts = self.torch, self.torchsort
        rng = np.random.default_rng(12345)
        x_np = rng.standard_normal((8, 64))
        w_np = rng.standard_normal((8, 64))
        x, w = jnp.asarray(x_np), jnp.asarray(w_np)
        for op in SOFT_OPS:
            for reg in REGULARIZATIONS:
                label = f"{op}_{reg}"
                if not (self.selected(label) and self.has(op)):
                    continue
                for eps in (0.1, 1.0, 100.0):
                    def f(a, op=op, reg=reg, eps=eps):
                        return getattr(self.sg, op)(a, regularization_strength=eps,
                                                    regularization=reg)
                    y_sg = np.asarray(f(x))
                    g_sg = np.asarray(jax.grad(lambda a: (f(a) * w).sum())(x))
                    xt = torch.from_numpy(x_np.copy()).requires_grad_(True)
                    y_t = getattr(ts, op)(xt, regularization=reg, regularization_strength=eps)
                    (y_t * torch.from_numpy(w_np)).sum().backward()
                    cf = close(y_sg, y_t.detach().numpy(), SOFT_TOL["float64"])
                    cb = close(g_sg, xt.grad.numpy(), SOFT_TOL["float64"])
                    rec = {"label": label, "regularization_strength": eps, "shape": [8, 64],
                           "dtype": "float64", "fwd_agree": cf["agree"],
                           "fwd_max_rel_err": cf["max_rel_err"], "grad_agree": cb["agree"],
                           "grad_max_rel_err": cb["max_rel_err"]}
                    out.append(rec)
                    print(f"  convention {label:<13} eps={eps:<6g} fwd rel "
                          f"{cf['max_rel_err']:.1e}  grad rel {cb['max_rel_err']:.1e}",
                          file=sys.stderr)
        return out

    # .. hard ops
    def hard(self, x_np, w_np, shape, dtype):
        x, w = jnp.asarray(x_np), jnp.asarray(w_np)
        k = min(TOP_K, shape[-1])

        def np_top_k(a):
            part = np.argpartition(-a, k - 1, axis=-1)[..., :k]
            vals = np.take_along_axis(a, part, axis=-1)
            # largest first; ties to the lower index (lexsort: last key is primary)
            order = np.lexsort((part, -vals), axis=-1)
            idx = np.take_along_axis(part, order, axis=-1)
            return np.take_along_axis(a, idx, axis=-1), idx

        cases = {
            "sort": dict(
                sg=lambda: getattr(self.sg, "sort", None),
                fwd={"jnp.sort": jax.jit(jnp.sort)},
                np={"np.sort": lambda a: np.sort(a, axis=-1)},
                grad_ref={"jnp.sort": jnp.sort}),
            "argsort": dict(
                sg=lambda: getattr(self.sg, "argsort", None),
                fwd={"jnp.argsort": jax.jit(lambda a: jnp.argsort(a, stable=True))},
                np={"np.argsort": lambda a: np.argsort(a, axis=-1, kind="stable")},
                grad_ref={}),
            "top_k": dict(
                sg=lambda: (lambda a: self.sg.top_k(a, k)) if self.has("top_k") else None,
                fwd={"jax.lax.top_k": jax.jit(lambda a: jax.lax.top_k(a, k))},
                np={"np.argpartition": np_top_k},
                grad_ref={}),
        }
        for op, c in cases.items():
            label = op if op != "top_k" else f"top_k{k}"
            if not (self.selected(op) or self.selected(label)):
                continue
            sg_op = c["sg"]()
            if sg_op is None:
                self.notes.append(f"{op}: sortgrad.{op} missing, skipped")
                continue
            common = dict(op=op, label=label, variant=None if op != "top_k" else f"k={k}",
                          shape=shape, dtype=dtype)
            sg_fwd = jax.jit(sg_op)
            ref_sg = jax.tree.map(np.asarray, _block(sg_fwd(x)))
            self.add(**common, pass_="fwd", impl="sortgrad",
                     timing=self.time(lambda: _block(sg_fwd(x))))
            for name, fn in c["fwd"].items():
                ref = jax.tree.map(np.asarray, _block(fn(x)))
                self.add(**common, pass_="fwd", impl=name, check=_exact_tree(ref_sg, ref),
                         timing=self.time(lambda fn=fn: _block(fn(x))))
            for name, fn in c["np"].items():
                ref = fn(x_np)
                # argpartition may pick a different one of several tied k-th values: recorded
                self.add(**common, pass_="fwd", impl=name, check=_exact_tree(ref_sg, ref),
                         timing=self.time(lambda fn=fn: fn(x_np)), required=op != "top_k")
            if c["grad_ref"]:
                sg_grad = jax.jit(jax.grad(lambda a, b: (sg_op(a) * b).sum()))
                g_sg = np.asarray(_block(sg_grad(x, w)))
                self.add(**common, pass_="fwd+bwd", impl="sortgrad",
                         timing=self.time(lambda: _block(sg_grad(x, w))))
                for name, fn in c["grad_ref"].items():
                    ref_grad = jax.jit(jax.grad(lambda a, b, fn=fn: (fn(a) * b).sum()))
                    g_ref = np.asarray(_block(ref_grad(x, w)))
                    self.add(**common, pass_="fwd+bwd", impl=name, check=exact(g_sg, g_ref),
                             timing=self.time(lambda f=ref_grad: _block(f(x, w))))

    # .. per-call overhead
    def overhead(self):
        if not self.selected("overhead"):
            return
        if not self.has("sort"):
            self.notes.append("overhead: sortgrad.sort missing, skipped")
            return
        a = self.args
        x = jnp.asarray(np.random.default_rng(1).standard_normal(8).astype(np.float32))
        fns = {"sortgrad.sort": jax.jit(self.sg.sort), "jnp.sort": jax.jit(jnp.sort),
               "jit(x+1)": jax.jit(lambda v: v + 1)}
        chk = exact(np.asarray(fns["sortgrad.sort"](x)), np.asarray(fns["jnp.sort"](x)))
        for impl, fn in fns.items():
            t = measure(lambda fn=fn: _block(fn(x)), a.overhead_calls, a.warmup + 20,
                        max_seconds=1e9)
            t = {**t, **{k.replace("_ms", "_us"): v * 1e3 for k, v in t.items()
                         if k.endswith("_ms")}}
            self.add(op="overhead", label="overhead", variant="8 elements", pass_="fwd",
                     shape=(8,), dtype="float32", impl=impl, timing=t,
                     check=chk if impl == "jnp.sort" else None)


def _cpu_flags() -> dict:
    """The CPU's vector extensions (/proc/cpuinfo flags) and lscpu's caches, for the JSON."""
    out = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                out["cpu_vector_extensions"] = [f for f in flags if f.startswith(
                    ("sse", "ssse", "avx", "fma", "f16c", "amx"))]
                break
    except OSError:
        pass
    try:
        import subprocess
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        out["cpu_caches"] = {ln.split(":")[0].strip(): ln.split(":", 1)[1].strip()
                             for ln in lscpu.splitlines() if " cache" in ln.split(":")[0]}
        fam = {ln.split(":")[0].strip(): ln.split(":", 1)[1].strip()
               for ln in lscpu.splitlines() if ln.split(":")[0].strip() in
               ("CPU family", "Model", "Vendor ID", "Hypervisor vendor")}
        out["cpu_id"] = fam
    except Exception:
        pass
    return out


def _memory_subprocess(impl, op, reg, shape, dtype) -> dict:
    """Runs `_memory_case` in a fresh interpreter; its JSON record (or an error)."""
    import json
    import subprocess
    spec = f"{impl},{op},{reg},{format_shape(shape)},{dtype}"
    try:
        done = subprocess.run([sys.executable, __file__, "--memory-case", spec],
                              capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"peak_extra_bytes": None, "error": "timeout"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        return {"peak_extra_bytes": None, "error": (done.stderr or "")[-500:]}
    return json.loads(lines[-1])


def _proc_status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _memory_case(spec: str) -> dict:
    """Child process: peak extra memory of one fwd+bwd (module docstring, --memory)."""
    impl, op, reg, shape_s, dtype = spec.split(",")
    shape = parse_shape(shape_s)
    n = int(np.prod(shape))
    rng = np.random.default_rng(0)
    x_np = np.empty(shape, dtype)
    w_np = np.empty(shape, dtype)
    for r in range(shape[0]):  # no float64 temporaries of the whole array
        x_np[r] = rng.standard_normal(shape[1])
        w_np[r] = rng.standard_normal(shape[1])
    tiny = np.ones((2, 600), dtype)
    if impl == "sortgrad":
        import sortgrad
        sg_op = getattr(sortgrad, op)

        def loss(x, w):
            return (sg_op(x, regularization_strength=EPS, regularization=reg) * w).sum()
        jax.block_until_ready(jax.jit(jax.grad(loss))(jnp.asarray(tiny), jnp.asarray(tiny)))
        x, w = jnp.asarray(x_np), jnp.asarray(w_np)
        del x_np, w_np
        compiled = jax.jit(jax.grad(loss)).lower(x, w).compile()

        def call():
            return jax.block_until_ready(compiled(x, w))
    else:
        torch, ts, _ = load_torch(usable_cores())
        ts_op = getattr(ts, op)
        xg = torch.from_numpy(x_np).requires_grad_(True)
        wt = torch.from_numpy(w_np)
        t_small = torch.from_numpy(tiny).requires_grad_(True)
        (ts_op(t_small, regularization=reg, regularization_strength=EPS)
         * torch.from_numpy(tiny)).sum().backward()

        def call():
            (ts_op(xg, regularization=reg, regularization_strength=EPS) * wt).sum().backward()
            return xg.grad
    gc.collect()
    before = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    out = call()
    peak = _proc_status("VmHWM")
    del out
    extra = peak - before
    return {"peak_extra_bytes": extra, "bytes_per_element": extra / n, "n_elements": n,
            "rss_before_bytes": before,
            "method": "VmHWM - VmRSS around the first full-size call, fresh process"}


def _torchsort_f64(torch, ts_op, reg, x_np, w_np):
    """torchsort forward and gradient of (op(x) * w).sum() in float64 on x's values."""
    xg = torch.from_numpy(x_np.astype(np.float64)).requires_grad_(True)
    y = ts_op(xg, regularization=reg, regularization_strength=EPS)
    (y * torch.from_numpy(w_np.astype(np.float64))).sum().backward()
    return y.detach().numpy(), xg.grad.numpy()


def _exact_tree(a, b) -> dict:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    if len(a) != len(b):
        return {"agree": False, "check": "exact", "note": "different number of outputs"}
    parts = [exact(u, v) for u, v in zip(a, b)]
    return {"agree": all(p["agree"] for p in parts), "check": "exact",
            "mismatches": [p["mismatches"] for p in parts] if len(parts) > 1
            else parts[0]["mismatches"]}


# --- report ---------------------------------------------------------------------------------

def markdown_table(records) -> str:
    rows = ["| shape | dtype | op | pass | sortgrad ms | baseline | baseline ms | ratio |",
            "|---|---|---|---|---:|---|---:|---:|"]
    for r in records:
        if r["impl"].startswith("sortgrad") or r.get("ratio_sortgrad_over_baseline") is None:
            continue
        unit = 1.0
        if r["op"] == "overhead":
            unit = 1e3
            sg_s, base_s = (f"{r['sortgrad_median_ms'] * unit:.1f} us",
                            f"{r['median_ms'] * unit:.1f} us")
        else:
            sg_s, base_s = f"{r['sortgrad_median_ms']:.3f}", f"{r['median_ms']:.3f}"
        flag = "" if r.get("agree", True) else " (!)"
        rows.append(f"| {r['shape_str']} | {r['dtype']} | {r['label']} | {r['pass']} | {sg_s} "
                    f"| {r['impl']}{flag} | {base_s} | {r['ratio_sortgrad_over_baseline']:.2f} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and few repeats (seconds; for CI)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default perf/results/cpu-<host>.json; "
                        "perf/results/cpu-<host>-smoke.json with --smoke)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per case (default 30, 5 with --smoke)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing (default 3, 1 with --smoke)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop a case after this long once 5 samples exist (default 3, 0.2 smoke)")
    p.add_argument("--overhead-calls", type=int, default=None,
                   help="calls for the per-call overhead median (default 2000, 200 smoke)")
    p.add_argument("--only", type=lambda s: [t for t in s.split(",") if t], default=None,
                   help="comma-separated glob patterns over case labels: soft_rank_l2, "
                        "soft_rank_kl, soft_sort_l2, soft_sort_kl, sort, argsort, top_k, "
                        "overhead (e.g. 'soft_*,sort')")
    p.add_argument("--shapes", type=lambda s: [parse_shape(t) for t in s.split(",") if t],
                   default=None, help="comma-separated shapes, e.g. 1024x1000,1x100000")
    p.add_argument("--dtypes", type=lambda s: [t for t in s.split(",") if t], default=None,
                   help="comma-separated dtypes (float32,float64)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of the soft-op timings (default 5, 2 smoke)")
    p.add_argument("--long-rows", action="store_true",
                   help="add the shapes " + ", ".join(format_shape(s) for s in LONG_SHAPES))
    p.add_argument("--sweep", action="store_true",
                   help="soft-op fwd+bwd time per element on one row of 2^10..2^22")
    p.add_argument("--memory", action="store_true",
                   help="peak extra memory of soft-op fwd+bwd (a subprocess per case) at "
                        + ", ".join(format_shape(s) for s in MEMORY_SHAPES)
                        + " (or --memory-shapes)")
    p.add_argument("--memory-shapes", type=lambda s: [parse_shape(t) for t in s.split(",")
                                                      if t], default=None)
    p.add_argument("--no-main", action="store_true",
                   help="skip the main shapes (only --sweep / --memory)")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="skip the torchsort baseline")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (default: the number of usable cores)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_case:
        import json
        print(json.dumps(_memory_case(args.memory_case)))
        return 0
    smoke = args.smoke
    args.rounds = args.rounds or (2 if smoke else 5)
    args.repeats = args.repeats or (5 if smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.max_seconds = args.max_seconds or (0.2 if smoke else 3.0)
    args.overhead_calls = args.overhead_calls or (200 if smoke else 2000)
    shapes = args.shapes or (SMOKE_SHAPES if smoke else SHAPES)
    if args.long_rows:
        shapes = shapes + [s for s in LONG_SHAPES if s not in shapes]
    if args.no_main:
        shapes = []
    dtypes = args.dtypes or DTYPES
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unsupported dtype {d!r}; choose from {DTYPES}")
    out = args.out or (RESULTS / f"cpu-{host_tag()}{'-smoke' if smoke else ''}.json")

    cores = usable_cores()
    torch, torchsort, torch_threads = ((None, None, None) if args.no_torch
                                       else load_torch(args.torch_threads or cores))
    sortgrad = load_sortgrad()
    bench = Bench(args, sortgrad, torch, torchsort)
    if torchsort is None:
        bench.notes.append("torchsort not loaded (--no-torch, or not installed): soft-op "
                           "baselines skipped")
    if jax.default_backend() != "cpu":
        bench.notes.append(f"JAX default backend is {jax.default_backend()}, not cpu")

    load_start = loadavg()
    if not smoke and load_start and load_start[0] > 0.5:
        msg = (f"load average {load_start[0]:.2f} at start: other work is running, "
               "timings will be noisy")
        bench.notes.append(msg)
        print(f"! {msg}", file=sys.stderr)
    t_start = time.perf_counter()
    print(f"sortgrad CPU benchmark: shapes {[format_shape(s) for s in shapes]}, "
          f"dtypes {dtypes}, {args.repeats} repeats, {cores} cores, torch threads "
          f"{torch_threads}", file=sys.stderr)
    if sortgrad is not None:
        rng = np.random.default_rng(args.seed)
        for shape in shapes:
            base_x = rng.standard_normal(shape)
            base_w = rng.standard_normal(shape)
            for dtype in dtypes:
                gc.collect()  # once per block: a full collection costs ~0.2 s with jax+torch
                x_np = base_x.astype(dtype)
                w_np = base_w.astype(dtype)
                bench.soft(x_np, w_np, shape, dtype)
                bench.hard(x_np, w_np, shape, dtype)
        if args.sweep:
            bench.sweep(dtypes)
        if args.memory:
            bench.memory(args.memory_shapes or ([(16, 1000)] if smoke else MEMORY_SHAPES),
                         dtypes)
        if not args.no_main:
            bench.overhead()
        conventions = bench.conventions() if not args.no_main else []
    else:
        conventions = []
    bench.link_ratios()
    load_end = loadavg()

    result = {
        "benchmark": "bench_cpu",
        "smoke": smoke,
        "config": {"shapes": [format_shape(s) for s in shapes], "dtypes": dtypes,
                   "repeats": args.repeats, "warmup": args.warmup,
                   "max_seconds": args.max_seconds, "overhead_calls": args.overhead_calls,
                   "only": args.only, "seed": args.seed, "regularization_strength": EPS,
                   "top_k": TOP_K, "soft_tolerance": SOFT_TOL,
                   "timer": "time.perf_counter per call, jax.block_until_ready for JAX"},
        "environment": {**cpu_environment(torch, torch_threads), **_cpu_flags()},
        "elapsed_s": time.perf_counter() - t_start,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "notes": bench.notes,
        "failed_checks": bench.failures,
        "convention_checks": conventions,
        "records": bench.records,
    }
    write_json(out, result)

    print(markdown_table(bench.records))
    print(f"\n{len(bench.records)} records -> {out} ({result['elapsed_s']:.1f} s)",
          file=sys.stderr)
    for n in bench.notes:
        print(f"note: {n}", file=sys.stderr)
    for f in bench.failures:
        print(f"CHECK FAILED: {f}", file=sys.stderr)
    if sortgrad is None:
        return 2
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
