"""Batch-sharded sortgrad ops on several devices: per-device rows vs a gather.

Problem: a (--rows, --n) float32 batch (default 8*1024 x 1000) split over --devices host CPU
devices (default 8, forced with --xla_force_host_platform_device_count; on a GPU machine the
real devices). Ops: `soft_rank` forward+backward (jit(grad(sum(rank^2)))) and `sort` forward.
Variants, all jitted, all on the same data:

  sharded     explicit mesh axes (jax.make_mesh(..., Explicit) + jax.set_mesh), the input split
              over the batch: the op wraps itself in shard_map, every device runs its own rows.
  gathered    the same split input under a plain jax.jit on an auto-axes mesh: JAX gives the
              op no sharding at trace time, so the callback runs on the whole array (what a
              user got before ops were sharding-aware).
  one-device  the unsplit array on device 0 (the single-device baseline).

Reported per case: median wall time over --rounds interleaved rounds (perf_counter around call
+ block_until_ready, after a warm-up), the number of all-gather / all-to-all instructions and
the bytes they gather in the compiled HLO, and XLA's per-device memory estimate (arguments +
outputs + temporaries). Results are checked before timing (every variant equal to one-device).
On a 2-core machine the point is the gather's absence and the memory, not the speed (eight
"devices" share two cores).

  python perf/bench_sharding.py              # -> perf/results/sharding-cpu-<host>.json
  python perf/bench_sharding.py --smoke      # tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8, help="host devices to force (CPU)")
    p.add_argument("--rows", type=int, default=8 * 1024)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.devices < 1 or args.rows < 1 or args.n < 1 or args.rounds < 1:
        p.error("--devices, --rows, --n and --rounds must be >= 1")
    if args.smoke:
        args.rows, args.n, args.rounds, args.repeats = 8 * args.devices, 16, 1, 1
    if args.rows % args.devices:
        p.error(f"--rows ({args.rows}) must be a multiple of --devices ({args.devices})")
    return args


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before JAX starts: the device count is fixed then
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}").strip()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, cpu_environment, host_tag, time_wall, write_json  # noqa: E402

_GATHER = re.compile(r"=\s*(\w+)\[([\d,]*)\][^=]*\b(all-gather|all-to-all)\(")
_ITEMSIZE = {"f32": 4, "f64": 8, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "pred": 1}


def gathers(hlo: str) -> dict:
    """All-gather / all-to-all instructions of a compiled HLO text and the bytes they produce."""
    count, nbytes = 0, 0
    for dtype, dims, _ in _GATHER.findall(hlo):
        count += 1
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        nbytes += size * _ITEMSIZE.get(dtype, 4)
    return {"gathers": count, "gathered_bytes": nbytes}


def memory(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return None
    if m is None:
        return None
    return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "temp_bytes": m.temp_size_in_bytes}


def main(args) -> int:
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import sortgrad

    devices = jax.devices()[:args.devices]
    x = np.random.default_rng(0).standard_normal((args.rows, args.n)).astype(np.float32)

    def rank_fwd_bwd(s):
        return jax.grad(lambda v: (sortgrad.soft_rank(v, regularization_strength=1.0) ** 2)
                        .sum())(s)

    ops = {"soft_rank fwd+bwd": rank_fwd_bwd, "sort fwd": sortgrad.sort}
    explicit = jax.make_mesh((len(devices),), ("batch",), axis_types=(AxisType.Explicit,),
                             devices=devices)
    auto = jax.make_mesh((len(devices),), ("batch",), axis_types=(AxisType.Auto,),
                         devices=devices)

    def variants(op):
        """name -> (compiled call, input, context manager factory)."""
        import contextlib
        with jax.set_mesh(explicit):
            xs = jax.device_put(x, P("batch", None))
            sharded = jax.jit(op).lower(xs).compile()
        xg = jax.device_put(x, NamedSharding(auto, P("batch", None)))
        gathered = jax.jit(op).lower(xg).compile()
        x1 = jax.device_put(x, devices[0])
        single = jax.jit(op).lower(x1).compile()
        return {"sharded": (sharded, xs, lambda: jax.set_mesh(explicit)),
                "gathered": (gathered, xg, contextlib.nullcontext),
                "one-device": (single, x1, contextlib.nullcontext)}

    records, failed = [], []
    table = {}
    for op_name, op in ops.items():
        table[op_name] = variants(op)
        reference = np.asarray(table[op_name]["one-device"][0](table[op_name]["one-device"][1]))
        for name, (compiled, arg, ctx) in table[op_name].items():
            with ctx():
                out = np.asarray(compiled(arg))
            if not np.allclose(out, reference, rtol=1e-5, atol=1e-5):
                failed.append(f"{op_name} {name}: differs from one-device")
    timings = {(o, v): [] for o in table for v in table[o]}
    for _ in range(args.rounds):  # interleaved: a busy spell of the machine hits all alike
        for op_name, vs in table.items():
            for name, (compiled, arg, ctx) in vs.items():
                with ctx():
                    t = time_wall(lambda: compiled(arg), jax.block_until_ready, 1, args.repeats)
                timings[(op_name, name)].append(t["median_ms"])
    for op_name, vs in table.items():
        base = float(np.median(timings[(op_name, "one-device")]))
        for name, (compiled, arg, ctx) in vs.items():
            med = float(np.median(timings[(op_name, name)]))
            rec = {"op": op_name, "variant": name, "shape": [args.rows, args.n],
                   "dtype": "float32", "devices": len(devices), "median_ms": med,
                   "round_medians_ms": timings[(op_name, name)],
                   "ratio_to_one_device": med / base if base else None,
                   **gathers(compiled.as_text()), "memory_per_device": memory(compiled)}
            records.append(rec)
            mem = rec["memory_per_device"]
            mem_txt = "" if mem is None else \
                f"  mem/device {(mem['argument_bytes'] + mem['output_bytes'] + mem['temp_bytes']) / 2**20:8.1f} MiB"
            print(f"{op_name:18s} {name:11s} {med:9.2f} ms  x{rec['ratio_to_one_device']:.2f}  "
                  f"gathers {rec['gathers']} ({rec['gathered_bytes'] / 2**20:.1f} MiB){mem_txt}")
    if any(r["variant"] == "sharded" and r["gathers"] for r in records):
        failed.append("a sharded program holds an all-gather")
    result = {"benchmark": "bench_sharding", "environment": cpu_environment(),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "records": records, "failed_checks": failed}
    out = args.out or RESULTS / f"sharding-{jax.default_backend()}-{host_tag()}.json"
    print("wrote", write_json(out, result))
    for f in failed:
        print("FAILED:", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
