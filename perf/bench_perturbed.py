"""CPU benchmark of `sortgrad.perturbed_top_k` (Berthet et al. 2020) against the ways a user
would otherwise write it.

Problem: S = --samples Gaussian draws (default 1000) of one score row of n = --n (1000), the
k = --k (16) largest selected in every draw, sigma 0.5, float32 (--dtype). Implementations, all
jitted, all on the same draws Z (so their results can be compared exactly):

  sortgrad          sortgrad.perturbed_top_k: all S perturbed rows through ONE batched call
                    of sortgrad.top_k, selections averaged by an integer scatter-add.
  lax-in-estimator  the same estimator with jax.lax.top_k selecting the batch (the
                    comparison "same batch, XLA's top-k").
  naive-loop        what one writes without a batched op: a Python loop over the S samples,
                    each a jitted call of lax.top_k on one row and a one-hot (k, n) added to a
                    running sum; its gradient loops again, accumulating f_s z_s.
  lax.map           the per-sample loop inside one jit (jax.lax.map over the samples).
  topk-batch        only the hard top-k of the (S, n) batch: sortgrad.top_k vs lax.top_k,
                    the selection cost inside the estimator.

Cases: "fwd" (P), and "fwd+bwd" (jit(grad(sum(P * W)))) for the estimators. Results are
checked before timing: every forward equals sortgrad's bit for bit, every gradient agrees to
float32 rounding; a failed check exits with status 1 after writing the JSON. Timing: single
calls with perf_counter around call + block_until_ready, after a warm-up call, in --rounds
rounds that interleave the implementations (a busy spell of the machine hits all alike);
medians and IQR in ms over all rounds, ratio sortgrad / baseline (< 1: sortgrad is faster).

  python perf/bench_perturbed.py           # -> perf/results/perturbed-cpu-<host>.json
  python perf/bench_perturbed.py --smoke   # tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

# as in bench_cpu.py: OpenMP workers (Numba's omp threading layer, torch) wait passively
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PERF = Path(__file__).resolve().parent
if str(PERF) not in sys.path:  # perf/_common.py, also when this file is not run as a script
    sys.path.insert(0, str(PERF))

from _common import (RESULTS, cpu_environment, host_tag, timing_stats,  # noqa: E402
                     write_json)

import numpy as np  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

SIGMA = 0.5


def _time_calls(call, count: int) -> list[float]:
    """Milliseconds of `count` single calls (the garbage collector paused while timing)."""
    out = []
    gc.disable()
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            call()
            out.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return out


def _hard_selection_sum(rows, k):
    """Sum over the leading axis of the one-hot (k, n) top-k selections of `rows` (S, n)."""
    idx = jax.lax.top_k(rows, k)[1]
    return jax.nn.one_hot(idx, rows.shape[-1], dtype=rows.dtype).sum(axis=0)


def build(sortgrad, perturbed_mod, x, key, k, num_samples, sigma, w):
    """name -> (forward, forward+backward or None) callables returning blocked results."""
    n = x.shape[-1]
    dtype = x.dtype
    z = jax.random.normal(key, (num_samples, n), dtype)  # the draws perturbed_top_k makes

    def estimator(selector):
        return lambda x_: perturbed_mod._perturbed_top_k(key, x_, k, num_samples, sigma, -1,
                                                          selector)

    impls = {}
    for name, selector in (("sortgrad", "sortgrad"), ("lax-in-estimator", "lax")):
        f = estimator(selector)
        fwd = jax.jit(f)
        bwd = jax.jit(jax.grad(lambda x_, f=f: (f(x_) * w).sum()))
        impls[name] = (fwd, bwd)

    one_sample = jax.jit(lambda x_, z_s: _hard_selection_sum((x_ + sigma * z_s)[None], k))
    sample_value = jax.jit(lambda x_, z_s: (_hard_selection_sum((x_ + sigma * z_s)[None], k)
                                            * w).sum())

    def naive_fwd(x_):
        total = jnp.zeros((k, n), dtype)
        for s in range(num_samples):
            total = total + one_sample(x_, z[s])
        return total / num_samples

    def naive_grad(x_):
        # the same estimator as sortgrad's VJP: sum_s (f_s - mean f) z_s / ((S - 1) sigma)
        f = jnp.stack([sample_value(x_, z[s]) for s in range(num_samples)])
        f = f - f.mean()
        return (f[:, None] * z).sum(axis=0) / ((num_samples - 1) * sigma)

    impls["naive-loop"] = (naive_fwd, naive_grad)
    mapped = jax.jit(lambda x_: jax.lax.map(lambda z_s: _hard_selection_sum(
        (x_ + sigma * z_s)[None], k), z).sum(axis=0) / num_samples)
    impls["lax.map"] = (mapped, None)
    batch = x[None] + sigma * z
    impls["topk-batch/sortgrad"] = (jax.jit(lambda b: sortgrad.top_k(b, k)), None)
    impls["topk-batch/lax"] = (jax.jit(lambda b: jax.lax.top_k(b, k)), None)
    return impls, batch


def check(impls, x, batch) -> list[dict]:
    """Agreement of every implementation with sortgrad's forward / gradient."""
    out = []
    p_ref = np.asarray(impls["sortgrad"][0](x))
    g_ref = np.asarray(impls["sortgrad"][1](x))
    scale = max(float(np.abs(g_ref).max()), 1e-30)
    for name, (fwd, bwd) in impls.items():
        if name.startswith("topk-batch"):
            continue
        p = np.asarray(fwd(x))
        rec = {"impl": name, "forward_equal": bool(np.array_equal(p, p_ref))}
        if bwd is not None:
            g = np.asarray(bwd(x))
            rel = float(np.abs(g - g_ref).max()) / scale
            rec.update(grad_max_rel_err=rel, grad_agree=rel <= 1e-4)
        out.append(rec)
    vs, is_ = (np.asarray(a) for a in impls["topk-batch/sortgrad"][0](batch))
    vl, il = (np.asarray(a) for a in impls["topk-batch/lax"][0](batch))
    out.append({"impl": "topk-batch", "forward_equal": bool(np.array_equal(vs, vl)
                                                            and np.array_equal(is_, il))})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds over all implementations")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    num_samples = args.samples or (20 if args.smoke else 1000)
    n = args.n or (50 if args.smoke else 1000)
    k = args.k or (4 if args.smoke else 16)
    repeats = args.repeats or (5 if args.smoke else 100)

    import sortgrad
    from sortgrad.bindings.jax import perturbed as perturbed_mod

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(n), args.dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), args.dtype)
    key = jax.random.PRNGKey(0)
    impls, batch = build(sortgrad, perturbed_mod, x, key, k, num_samples, SIGMA, w)

    checks = check(impls, x, batch)
    failed = [c["impl"] for c in checks
              if not c["forward_equal"] or not c.get("grad_agree", True)]
    for c in checks:
        print("check", c, flush=True)

    # Rounds interleave the implementations, so a slow spell of the (shared) machine hits all
    # of them alike; each round times every case `per_round` times after one warm-up call.
    cases = []
    for name, (fwd, bwd) in impls.items():
        arg = batch if name.startswith("topk-batch") else x
        for case, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
            if fn is not None:
                cases.append((name, case, lambda fn=fn, arg=arg: jax.block_until_ready(fn(arg))))
    times = {(name, case): [] for name, case, _ in cases}
    for round_no in range(args.rounds):
        for name, case, call in cases:
            per_round = 1 if name == "naive-loop" else max(1, repeats // args.rounds)
            if round_no == 0:
                call()  # warm-up: compilation, caches
            times[(name, case)].extend(_time_calls(call, per_round))
            gc.collect()
    records = []
    for (name, case), ms in times.items():
        records.append({"impl": name, "case": case,
                        **timing_stats(ms, unit="ms", count_key="samples", iqr=True)})
    by = {(r["impl"], r["case"]): r for r in records}
    for r in records:
        ref = by.get(("topk-batch/sortgrad" if r["impl"].startswith("topk-batch") else
                      "sortgrad", r["case"]))
        if ref is not None and ref is not r:
            r["ratio_sortgrad_over_this"] = ref["median_ms"] / r["median_ms"]
        ratio = r.get("ratio_sortgrad_over_this")
        print(f"{r['impl']:>22} {r['case']:>8} {r['median_ms']:10.3f} ms"
              + (f"   sortgrad / this = {ratio:.3f}" if ratio else ""), flush=True)

    result = {"environment": cpu_environment(),
              "problem": {"samples": num_samples, "n": n, "k": k, "sigma": SIGMA,
                          "dtype": args.dtype},
              "checks": checks, "failed_checks": failed, "records": records}
    out = args.out or (RESULTS /
                       f"perturbed-cpu-{host_tag()}{'-smoke' if args.smoke else ''}.json")
    write_json(out, result)
    print(f"wrote {out}")
    if failed:
        print(f"FAILED checks: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
