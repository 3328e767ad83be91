"""CPU benchmark of top-k: sortgrad.top_k against jax.lax.top_k over the issue-15 matrix.

Cases: shapes 1 x 2^10 .. 1 x 2^22 (every power of two), 1024x1000 and 4096x4096; k in
{1, 16, 64, 256, 1024} (k <= n); float32 and float64; two passes:
  fwd       jit(lambda x: op(x, k))                       -> (values, indices)
  fwd+bwd   jit(grad(lambda x, w: (op(x, k)[0] * w).sum()))  -> dx (the cotangent scatter)
with op = sortgrad.top_k or jax.lax.top_k, both jitted, on the same standard-normal data.

Checks before timing (every case, both passes): values bit for bit, indices exactly and the
gradients exactly equal to lax's; a failed check is recorded in the JSON ("agree": false) and
makes the script exit with status 1 after writing it.

Timing: the machine may be shared, so implementations are compared within rounds: each round
times every case once per implementation, sortgrad and lax back to back (the order alternates
between rounds), each as the median of `calls` calls (chosen per case so that one round costs
about --target-ms; at least 1). A case's result is the median over --rounds rounds of these
per-round medians, and the ratio sortgrad / lax is taken from the same run (also per round:
"ratio_median" is the median of the per-round ratios). Numba compilation and jit tracing happen
in an untimed warm-up. OMP_WAIT_POLICY defaults to PASSIVE (as perf/bench_cpu.py).

  python perf/bench_top_k_cpu.py                               # full matrix, ~20-40 min
  python perf/bench_top_k_cpu.py --shapes 1x1048576,4096x4096 --k 1,256 --dtypes float32
  python perf/bench_top_k_cpu.py --smoke                       # seconds (CI)

Writes perf/results/topk-cpu-<host>.json (-smoke with --smoke) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PERF = Path(__file__).resolve().parent
if str(PERF) not in sys.path:
    sys.path.insert(0, str(PERF))

from _common import (RESULTS, cpu_environment, format_shape, host_tag, loadavg,  # noqa: E402
                     parse_shape, write_json)

import numpy as np  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64 cases; every array has an explicit dtype

import jax.numpy as jnp  # noqa: E402

SHAPES = [(1, 1 << p) for p in range(10, 23)] + [(1024, 1000), (4096, 4096)]
SMOKE_SHAPES = [(1, 1 << 10), (1, 1 << 16), (16, 1000)]
KS = [1, 16, 64, 256, 1024]
DTYPES = ["float32", "float64"]
PASSES = ["fwd", "fwd+bwd"]
IMPLS = ["sortgrad", "jax.lax.top_k"]


def _block(x):
    return jax.block_until_ready(x)


def _functions(sortgrad, k):
    ops = {"sortgrad": lambda a: sortgrad.top_k(a, k), "jax.lax.top_k": lambda a: jax.lax.top_k(a, k)}
    fns = {}
    for impl, op in ops.items():
        fns[(impl, "fwd")] = jax.jit(op)
        fns[(impl, "fwd+bwd")] = jax.jit(jax.grad(lambda a, w, op=op: (op(a)[0] * w).sum()))
    return fns


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        np.array_equal(a.view(np.uint8), b.view(np.uint8)))


class Case:
    def __init__(self, shape, k, dtype, pass_, fns, x, w):
        self.shape, self.k, self.dtype, self.pass_ = shape, k, dtype, pass_
        self.x, self.w = x, w
        self.calls = {impl: (lambda f=fns[(impl, pass_)]: _block(f(x)))
                      if pass_ == "fwd" else (lambda f=fns[(impl, pass_)]: _block(f(x, w)))
                      for impl in IMPLS}
        self.samples = {impl: [] for impl in IMPLS}  # per-round medians, ms
        self.repeats = 1
        self.check = None

    @property
    def label(self):
        return f"{format_shape(self.shape)} {self.dtype} k={self.k} {self.pass_}"

    def verify(self):
        outs = {impl: jax.tree.map(np.asarray, call()) for impl, call in self.calls.items()}
        a, b = outs["sortgrad"], outs["jax.lax.top_k"]
        if self.pass_ == "fwd":
            ok_values, ok_indices = _same_bits(a[0], b[0]), _same_bits(a[1], b[1])
            self.check = {"agree": ok_values and ok_indices, "values_bits_equal": ok_values,
                          "indices_equal": ok_indices}
        else:
            self.check = {"agree": _same_bits(a, b), "gradient_bits_equal": _same_bits(a, b)}

    def warm(self, target_ms: float, max_calls: int):
        """Untimed warm-up (compilation), then the calls per round from one timed call."""
        per = []
        for impl, call in self.calls.items():
            call()
            t0 = time.perf_counter()
            call()
            per.append((time.perf_counter() - t0) * 1e3)
        self.repeats = int(max(1, min(max_calls, target_ms / max(max(per), 1e-3))))

    def round(self, flip: bool):
        order = IMPLS[::-1] if flip else IMPLS
        for impl in order:
            call = self.calls[impl]
            times = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            self.samples[impl].append(float(np.median(times)))

    def record(self) -> dict:
        sg = np.asarray(self.samples["sortgrad"])
        lx = np.asarray(self.samples["jax.lax.top_k"])
        n = int(np.prod(self.shape))
        rec = {"shape": list(self.shape), "shape_str": format_shape(self.shape), "k": self.k,
               "dtype": self.dtype, "pass": self.pass_, "n_elements": n,
               "calls_per_round": self.repeats, "rounds": int(sg.size), **self.check}
        for impl, a in (("sortgrad", sg), ("lax", lx)):
            rec[f"{impl}_median_ms"] = float(np.median(a))
            rec[f"{impl}_min_ms"] = float(a.min())
            rec[f"{impl}_round_ms"] = [float(v) for v in a]
        rec["ratio"] = rec["sortgrad_median_ms"] / rec["lax_median_ms"]
        rec["ratio_median"] = float(np.median(sg / lx))
        rec["met"] = bool(rec["ratio"] <= 1.0)
        return rec


def markdown_table(records) -> str:
    rows = ["| shape | dtype | k | pass | sortgrad ms | lax.top_k ms | ratio |",
            "|---|---|---:|---|---:|---:|---:|"]
    for r in records:
        flag = "" if r["agree"] else " (!)"
        rows.append(f"| {r['shape_str']} | {r['dtype']} | {r['k']} | {r['pass']} | "
                    f"{r['sortgrad_median_ms']:.3f} | {r['lax_median_ms']:.3f}{flag} | "
                    f"{r['ratio']:.2f} |")
    return "\n".join(rows)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds (CI)")
    p.add_argument("--shapes", type=lambda s: [parse_shape(t) for t in s.split(",") if t],
                   default=None, help="comma-separated shapes (default: the issue's matrix)")
    p.add_argument("--k", type=lambda s: [int(t) for t in s.split(",") if t], default=None,
                   help="comma-separated k values (default 1,16,64,256,1024; k > n skipped)")
    p.add_argument("--dtypes", type=lambda s: [t for t in s.split(",") if t], default=None)
    p.add_argument("--passes", type=lambda s: [t for t in s.split(",") if t], default=None,
                   help="fwd, fwd+bwd or both (default)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--target-ms", type=float, default=None,
                   help="time per case, implementation and round (default 60; calls chosen "
                        "from it, at least 1)")
    p.add_argument("--max-calls", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default perf/results/topk-cpu-<host>[-smoke].json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    smoke = args.smoke
    shapes = args.shapes or (SMOKE_SHAPES if smoke else SHAPES)
    ks = args.k or KS
    dtypes = args.dtypes or DTYPES
    passes = args.passes or PASSES
    rounds = args.rounds or (2 if smoke else 5)
    target_ms = args.target_ms or (5.0 if smoke else 60.0)
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unsupported dtype {d!r}; choose from {DTYPES}")
    for p_ in passes:
        if p_ not in PASSES:
            raise SystemExit(f"unsupported pass {p_!r}; choose from {PASSES}")
    out = args.out or (RESULTS / f"topk-cpu-{host_tag()}{'-smoke' if smoke else ''}.json")

    import sortgrad
    rng = np.random.default_rng(args.seed)
    cases = []
    load_start = loadavg()
    t_start = time.perf_counter()
    print(f"top-k CPU benchmark: {len(shapes)} shapes, k {ks}, {dtypes}, {passes}, "
          f"{rounds} rounds", file=sys.stderr, flush=True)
    for shape in shapes:
        base = rng.standard_normal(shape)
        for dtype in dtypes:
            x = jnp.asarray(base.astype(dtype))
            for k in ks:
                if k > shape[-1]:
                    continue
                w = jnp.asarray(rng.standard_normal(shape[:-1] + (k,)).astype(dtype))
                fns = _functions(sortgrad, k)
                for pass_ in passes:
                    case = Case(shape, k, dtype, pass_, fns, x, w)
                    case.verify()
                    case.warm(target_ms, args.max_calls)
                    cases.append(case)
                    print(f"  prepared {case.label}: {case.repeats} calls/round"
                          f"{'' if case.check['agree'] else '  DISAGREES WITH LAX'}",
                          file=sys.stderr, flush=True)
    for r in range(rounds):
        gc.collect()
        gc.disable()
        try:
            for case in cases:
                case.round(flip=bool(r % 2))
        finally:
            gc.enable()
        print(f"  round {r + 1}/{rounds} done ({time.perf_counter() - t_start:.0f} s)",
              file=sys.stderr, flush=True)
    records = [c.record() for c in cases]
    failures = [r for r in records if not r["agree"]]
    met = [r for r in records if r["met"]]
    result = {
        "benchmark": "bench_top_k_cpu",
        "smoke": smoke,
        "config": {"shapes": [format_shape(s) for s in shapes], "k": ks, "dtypes": dtypes,
                   "passes": passes, "rounds": rounds, "target_ms": target_ms,
                   "max_calls": args.max_calls, "seed": args.seed,
                   "timer": "time.perf_counter per call, jax.block_until_ready; per-round "
                            "median of calls, median over rounds"},
        "environment": cpu_environment(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "elapsed_s": time.perf_counter() - t_start,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "summary": {"cases": len(records), "met": len(met),
                    "not_met": [f"{r['shape_str']} {r['dtype']} k={r['k']} {r['pass']}: "
                                f"{r['ratio']:.2f}" for r in records if not r["met"]],
                    "failed_checks": len(failures)},
        "records": records,
    }
    write_json(out, result)
    print(markdown_table(records))
    print(f"\n{len(records)} cases, {len(met)} with sortgrad <= lax; -> {out} "
          f"({result['elapsed_s']:.0f} s)", file=sys.stderr)
    for r in failures:
        print(f"CHECK FAILED: {r['shape_str']} {r['dtype']} k={r['k']} {r['pass']}",
              file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
