"""Per-call cost of sortgrad's JAX ops on tiny inputs, against the nearest jnp / lax op.

Every public op on one row of 8 float32 elements, jitted (and eager where said), timed as one
call + block_until_ready, interleaved with its comparison in every round:
  sort / argsort / top_k(x, 2) / sort_multiple / lexsort    vs jnp.sort / jnp.argsort /
                                                              lax.top_k / lax.sort / jnp.lexsort
  soft_rank / soft_sort / soft_top_k_mask(x, 2) / soft_quantile(x, 0.5) (explicit strength and
  the default softness)                                       vs jnp.argsort / jnp.sort /
                                                              lax.top_k / jnp.quantile
  fwd+bwd: jit(grad(sum(op(x) * w))) for sort and soft_rank   vs the same through jnp.sort
  eager: sortgrad.sort, soft_rank, soft_quantile              vs eager jnp.sort / argsort /
                                                              quantile
Where the time goes, measured beside them: `x + 1` (XLA's dispatch of a compiled program) and
`callback floor` (a buffer_callback whose body views its buffers as NumPy and calls a trivial
Numba function: the least any host-callback op costs). Target (issue 15): at most 10 us over
the comparison ("met" in each record).

  python perf/bench_call_overhead.py            # -> perf/results/call-overhead-<host>.json
  python perf/bench_call_overhead.py --smoke    # 2 rounds, few calls (CI)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, cpu_environment, host_tag, loadavg, write_json  # noqa: E402

TARGET_US = 10.0


def _cases(jax, jnp, sortgrad, numba, np):
    from jax.experimental.buffer_callback import buffer_callback

    @numba.njit(nogil=True)
    def copy_kernel(x, out, index):
        for i in range(x.shape[0]):
            out[i] = x[i]
            index[i] = i

    def floor_pass(ctx, outs, x):
        copy_kernel(np.asarray(x), np.asarray(outs[0]), np.asarray(outs[1]))

    def floor(x):
        specs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, np.int32))
        return buffer_callback(floor_pass, specs)(x)[0]

    w = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)

    def loss(op):
        return jax.grad(lambda v: jnp.sum(op(v) * w))

    j = jax.jit
    eps = {"regularization_strength": 1.0}
    # (name, sortgrad function, comparison name, comparison function); "~" marks the
    # reference rows (no comparison)
    return [
        ("x + 1", j(lambda x: x + 1), None, None),
        ("callback floor", j(floor), None, None),
        ("sort", j(sortgrad.sort), "jnp.sort", j(jnp.sort)),
        ("argsort", j(sortgrad.argsort), "jnp.argsort", j(lambda x: jnp.argsort(x, stable=True))),
        ("top_k", j(lambda x: sortgrad.top_k(x, 2)), "lax.top_k",
         j(lambda x: jax.lax.top_k(x, 2))),
        ("sort_multiple", j(lambda x: sortgrad.sort_multiple((x, -x), num_keys=1)), "lax.sort",
         j(lambda x: jax.lax.sort((x, -x), num_keys=1))),
        ("lexsort", j(lambda x: sortgrad.lexsort((x, -x))), "jnp.lexsort",
         j(lambda x: jnp.lexsort((x, -x)))),
        ("soft_rank eps=1", j(lambda x: sortgrad.soft_rank(x, **eps)), "jnp.argsort",
         j(lambda x: jnp.argsort(x, stable=True))),
        ("soft_rank default", j(sortgrad.soft_rank), "jnp.argsort",
         j(lambda x: jnp.argsort(x, stable=True))),
        ("soft_sort eps=1", j(lambda x: sortgrad.soft_sort(x, **eps)), "jnp.sort", j(jnp.sort)),
        ("soft_top_k_mask eps=1", j(lambda x: sortgrad.soft_top_k_mask(x, 2, **eps)),
         "lax.top_k", j(lambda x: jax.lax.top_k(x, 2))),
        ("soft_quantile eps=1", j(lambda x: sortgrad.soft_quantile(x, 0.5, **eps)),
         "jnp.quantile", j(lambda x: jnp.quantile(x, 0.5))),
        ("fwd+bwd sort", j(loss(sortgrad.sort)), "fwd+bwd jnp.sort", j(loss(jnp.sort))),
        ("fwd+bwd soft_rank eps=1", j(loss(lambda v: sortgrad.soft_rank(v, **eps))),
         "fwd+bwd jnp.sort", j(loss(jnp.sort))),
        ("eager sort", sortgrad.sort, "eager jnp.sort", jnp.sort),
        ("eager soft_rank eps=1", lambda x: sortgrad.soft_rank(x, **eps), "eager jnp.argsort",
         lambda x: jnp.argsort(x, stable=True)),
        ("eager soft_quantile eps=1", lambda x: sortgrad.soft_quantile(x, 0.5, **eps),
         "eager jnp.quantile", lambda x: jnp.quantile(x, 0.5)),
    ]


def _time(fn, x, calls, block):
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        block(fn(x))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="2 rounds of few calls (CI)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9)")
    p.add_argument("--calls", type=int, default=None, help="calls per round (default 300)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.smoke else 9)
    calls = args.calls or (20 if args.smoke else 300)
    out = args.out or RESULTS / f"call-overhead-{host_tag()}{'-smoke' if args.smoke else ''}.json"

    import jax
    import jax.numpy as jnp
    import numba
    import numpy as np

    import sortgrad
    x = jnp.asarray(np.random.default_rng(0).standard_normal(8), jnp.float32)
    cases = _cases(jax, jnp, sortgrad, numba, np)
    timed = {}
    for name, fn, ref_name, ref in cases:
        timed[name] = fn
        if ref_name is not None:
            timed[ref_name] = ref
    for fn in timed.values():
        for _ in range(30):
            jax.block_until_ready(fn(x))
    samples = {name: [] for name in timed}
    load_start = loadavg()
    for r in range(rounds):
        names = list(timed) if r % 2 == 0 else list(reversed(timed))
        gc.collect()
        gc.disable()
        try:
            for name in names:
                samples[name].append(_time(timed[name], x, calls, jax.block_until_ready))
        finally:
            gc.enable()
    median = {name: statistics.median(v) for name, v in samples.items()}
    records = []
    for name, _, ref_name, _ in cases:
        record = {"op": name, "us": median[name], "rounds_us": samples[name]}
        if ref_name is not None:
            over = median[name] - median[ref_name]
            record.update(comparison=ref_name, comparison_us=median[ref_name], over_us=over,
                          met=over <= TARGET_US)
        records.append(record)
    result = {"benchmark": "bench_call_overhead", "smoke": args.smoke,
              "config": {"elements": 8, "dtype": "float32", "rounds": rounds, "calls": calls,
                         "timer": "perf_counter per call + block_until_ready; median of the "
                                  "calls of a round, median over interleaved rounds",
                         "target_over_us": TARGET_US},
              "environment": cpu_environment(), "loadavg_start": load_start,
              "loadavg_end": loadavg(), "records": records}
    write_json(out, result)
    print(f"| op | us | comparison | us | over |\n|---|---:|---|---:|---:|")
    for rec in records:
        if "comparison" in rec:
            print(f"| {rec['op']} | {rec['us']:.1f} | {rec['comparison']} | "
                  f"{rec['comparison_us']:.1f} | {rec['over_us']:+.1f}"
                  f"{'' if rec['met'] else ' (not met)'} |")
        else:
            print(f"| {rec['op']} | {rec['us']:.1f} | | | |")
    print(f"-> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
