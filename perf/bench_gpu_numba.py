"""GPU benchmark of the Numba CUDA kernels (backend "numba") against GPU sorts / top-k of JAX,
CuPy and torch.

Cases (float32; "2^24" = 16,777,216 elements in all):
  sort_rows32 / sort_rows1024 / sort_rows4096   segmented_sort of 2^24 in rows of 32/1024/4096
  sort_ragged                                   2^24 in CSR segments of mixed lengths (tiny,
                                                medium and a few long ones; fixed seed)
  top_k{1,16,64,256}                            top-k of 2^24 in rows of 4096
  scatter_rows4096 / scatter_1row               permutation_scatter of 2^24 (rows of 4096;
                                                one row of 2^24: the unstaged path)
  pav_l2_4096x1024 / pav_l2_16x65536            isotonic_rows ("l2"), when
                                                sortgrad.kernels.isotonic._numba_cuda exists
Baselines, when importable and on a GPU: jnp.sort / jax.lax.top_k (jitted), cupy.sort,
torch.sort / torch.topk (sort rows and top-k cases only).

Every case is first checked against the CPU backend (sort, top-k, scatter: exact, bits and
indices; PAV: solution within float32 rounding, rtol 1e-4, and the fraction of equal block
ids). Timing: `--warmup` calls, then `--repeats` calls each timed with CUDA events on the launch
stream (torch / CuPy events for their baselines; JAX: wall clock around block_until_ready).
Reported: median / p25 / p75 ms, elements/s, and the fraction of the measured device-to-device
copy bandwidth reached by the kernel's minimal traffic (bytes it must read and write once,
e.g. sort: keys in, values and int32 perm out). JSON (device, driver, library versions, git
commit, every record) goes to perf/results/gpu-numba-<device>.json unless --out is given.

  python perf/bench_gpu_numba.py                   # full run (needs a CUDA GPU)
  python perf/bench_gpu_numba.py --only 'top_k*'   # a subset (fnmatch on case names)
  python perf/bench_gpu_numba.py --smoke           # tiny sizes; also runs on the simulator
                                                   # (NUMBA_ENABLE_CUDASIM=1) for CI
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

PERF = Path(__file__).resolve().parent
if str(PERF) not in sys.path:  # perf/_common.py, also when this file is not run as a script
    sys.path.insert(0, str(PERF))

from _common import (RESULTS, bandwidth_fraction, copy_bandwidth, device_tag,  # noqa: E402
                     git_info, jax_on_gpu, module_version, nvidia_smi, selected, time_cupy,
                     time_torch, time_wall, timing_stats, torch_cuda, utc_now, write_json)

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from sortgrad import kernels  # noqa: E402
from sortgrad.kernels._cuda import numba_support as ns  # noqa: E402
from sortgrad.kernels.permutation import _numba_cuda as perm_nb  # noqa: E402
from sortgrad.kernels.segmented_sort import _numba_cuda as sort_nb  # noqa: E402
from sortgrad.kernels.top_k import _numba_cuda as topk_nb  # noqa: E402
from sortgrad.testing import same_bits  # noqa: E402

TOTAL = 1 << 24
SMOKE_TOTAL = 128
TOP_KS = (1, 16, 64, 256)
SMOKE_TOP_KS = (1, 4)
# Lowered constants for --smoke on the simulator (as the tests do): small tiles and blocks.
SIMULATOR_CONSTANTS = {
    sort_nb: dict(SORT_TILE=16, SORT_THREADS=32, MERGE_THREADS=32, MERGE_ITEMS=4),
    topk_nb: dict(TOPK_THREADS=32, TOPK_MAX_K=8, TOPK_CACHE_BYTES=64, TOPK_SPLIT_CHUNK=8),
    perm_nb: dict(PERM_THREADS=32, PERM_STAGE_BYTES=64),
}


def environment() -> dict:
    env = {**git_info(),
           "date": utc_now(),
           "python": platform.python_version(), "platform": platform.platform(),
           "simulator": ns.SIMULATOR,
           "versions": {m: module_version(m) for m in ("numpy", "numba", "jax", "jaxlib",
                                                       "cupy", "torch")}}
    if ns.SIMULATOR:
        env["device"] = "Numba CUDA simulator"
        return env
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    limits = ns.device_limits()
    env.update(device=name, compute_capability=list(dev.compute_capability),
               multiprocessors=limits.multiprocessor_count,
               driver_version=cuda.cudadrv.driver.driver.get_version(),
               runtime_version=cuda.runtime.get_version(),
               nvidia_smi=nvidia_smi("name,driver_version,clocks.max.sm,memory.total"))
    return env


# --- timing -------------------------------------------------------------------------------------

def time_numba(call, stream, warmup: int, repeats: int) -> dict:
    """CUDA events around each call on `stream` (wall clock on the simulator: no timings)."""
    for _ in range(warmup):
        call()
    stream.synchronize() if hasattr(stream, "synchronize") else cuda.synchronize()
    ms = []
    for _ in range(repeats):
        if ns.SIMULATOR:
            t0 = time.perf_counter()
            call()
            ms.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = cuda.event(), cuda.event()
        start.record(stream)
        call()
        end.record(stream)
        end.synchronize()
        ms.append(cuda.event_elapsed_time(start, end))
    return dict(timing_stats(ms), timer="wall (simulator)" if ns.SIMULATOR else "cuda events")


def numba_copy_bandwidth(stream, nbytes: int, warmup: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = cuda.device_array(nbytes // 4, np.float32)
    dst = cuda.device_array(nbytes // 4, np.float32)
    if ns.SIMULATOR:
        return float("nan")
    timing = time_numba(lambda: dst.copy_to_device(src, stream=stream), stream, warmup, repeats)
    return copy_bandwidth(src.nbytes, timing["median_ms"] * 1e-3)


# --- baselines ------------------------------------------------------------------------------

def _cupy():
    if ns.SIMULATOR:
        return None
    try:
        import cupy
        return cupy if cupy.cuda.runtime.getDeviceCount() else None
    except Exception:
        return None


def baselines(kind: str, x_host: np.ndarray, k: int | None, warmup: int, repeats: int) -> list:
    """(impl, timing, agree) for the available GPU libraries; `agree` compares with the CPU
    backend (sort values; top-k values and indices)."""
    out = []
    if k is None:
        want = kernels.segmented_sort(x_host)[0]
    else:
        want_v, want_i = kernels.top_k(x_host, k)
    jax = jax_on_gpu()
    if jax is not None:
        import jax.numpy as jnp
        xj = jax.device_put(jnp.asarray(x_host), jax.devices("gpu")[0])
        fn = jax.jit(jnp.sort) if k is None else jax.jit(lambda a: jax.lax.top_k(a, k))
        res = jax.block_until_ready(fn(xj))
        agree = (np.array_equal(np.asarray(res).view(np.uint32), want.view(np.uint32))
                 if k is None else np.array_equal(np.asarray(res[1]), want_i))
        out.append(("jnp.sort" if k is None else "jax.lax.top_k",
                    time_wall(lambda: fn(xj), jax.block_until_ready, warmup, repeats), agree))
    cupy = _cupy()
    if cupy is not None and k is None:
        xc = cupy.asarray(x_host)
        res = cupy.sort(xc, axis=-1)
        agree = bool(np.array_equal(np.nan_to_num(res.get()), np.nan_to_num(want)))
        out.append(("cupy.sort", time_cupy(cupy, lambda: cupy.sort(xc, axis=-1), warmup,
                                                  repeats, timer="cupy cuda events"), agree))
    torch = torch_cuda()
    if torch is not None:
        xt = torch.as_tensor(x_host, device="cuda")
        if k is None:
            fn = lambda: torch.sort(xt, dim=-1, stable=True)  # noqa: E731
            agree = bool(np.array_equal(fn()[0].cpu().numpy().view(np.uint32),
                                        want.view(np.uint32)))
        else:
            fn = lambda: torch.topk(xt, k, dim=-1)  # noqa: E731
            agree = bool(np.array_equal(fn()[1].cpu().numpy(), want_i))
        out.append(("torch.sort" if k is None else "torch.topk",
                    time_torch(torch, fn, warmup, repeats), agree))
    return out


# --- cases ----------------------------------------------------------------------------------

def ragged_offsets(total: int, rng) -> np.ndarray:
    """Mostly tiny segments, some medium ones, a few long ones; sums to `total`."""
    lengths = []
    remaining = total
    long_len = max(total // 8, 2)
    for _ in range(min(3, total // (2 * long_len))):
        lengths.append(long_len)
        remaining -= long_len
    while remaining > 0:
        u = rng.random()
        size = int(rng.integers(1, 33)) if u < 0.8 else int(rng.integers(100, 4097))
        size = min(size, remaining)
        lengths.append(size)
        remaining -= size
    lengths = rng.permutation(np.array(lengths, dtype=np.int64))
    return np.concatenate([[0], np.cumsum(lengths)])


def run(args) -> dict:
    if ns.SIMULATOR:
        sys.setswitchinterval(5e-5)  # the simulator's barriers poll: ~5x faster
    if ns.SIMULATOR or args.small_constants:
        for module, values in SIMULATOR_CONSTANTS.items():
            for name, value in values.items():
                setattr(module, name, value)
    total = SMOKE_TOTAL if args.smoke else TOTAL
    top_ks = SMOKE_TOP_KS if args.smoke else TOP_KS
    row_lengths = (8, 32, 64) if args.smoke else (32, 1024, 4096)
    topk_row = 64 if args.smoke else 4096
    rng = np.random.default_rng(0)
    stream = cuda.stream()
    warmup, repeats = args.warmup, args.repeats
    result = {"environment": environment(), "total_elements": total, "records": [],
              "failed_checks": []}
    bandwidth = numba_copy_bandwidth(stream, total * 4 * 4, warmup, repeats)
    result["copy_bandwidth_bytes_per_s"] = bandwidth

    def record(case, impl, timing, elements, min_bytes, agree, **extra):
        seconds = timing["median_ms"] * 1e-3
        r = dict(case=case, impl=impl, elements=elements, agree=bool(agree), **timing, **extra)
        if seconds > 0:
            r["elements_per_s"] = elements / seconds
            r["min_bytes"] = min_bytes
            r["fraction_of_copy_bandwidth"] = bandwidth_fraction(min_bytes, seconds, bandwidth)
        result["records"].append(r)
        if not agree:
            result["failed_checks"].append(f"{case}/{impl}")
        print(f"{case:>22} {impl:>14}  {timing['median_ms']:9.3f} ms  "
              f"{r.get('elements_per_s', 0) / 1e9:7.2f} Gelem/s  "
              f"bw {r.get('fraction_of_copy_bandwidth') or 0:5.2f}  agree={agree}", flush=True)

    # Segmented sort in rows.
    for n in row_lengths:
        name = f"sort_rows{n}"
        if not selected(name, args.only):
            continue
        x = rng.standard_normal((total // n, n)).astype(np.float32)
        dx = cuda.to_device(x, stream=stream)
        values, perm = sort_nb.sort_rows(dx, False, stream=stream)
        want_v, want_p = kernels.segmented_sort(x)
        agree = same_bits(values.copy_to_host(), want_v, check_dtype=False) and \
            np.array_equal(perm.copy_to_host(), want_p)
        timing = time_numba(lambda: sort_nb.sort_rows(dx, False, stream=stream), stream,
                            warmup, repeats)
        record(name, "sortgrad-numba", timing, x.size, 12 * x.size, agree, shape=list(x.shape))
        for impl, t, ok in baselines("sort", x, None, warmup, repeats):
            record(name, impl, t, x.size, 8 * x.size, ok, shape=list(x.shape))

    # Ragged segments.
    if selected("sort_ragged", args.only):
        offsets = ragged_offsets(total, rng)
        x = rng.standard_normal(total).astype(np.float32)
        dx = cuda.to_device(x, stream=stream)
        values, perm = sort_nb.sort_segments(dx, offsets, False, stream=stream)
        want_v, want_p = kernels.segmented_sort(x, offsets)
        agree = same_bits(values.copy_to_host(), want_v, check_dtype=False) and \
            np.array_equal(perm.copy_to_host(), want_p)
        timing = time_numba(lambda: sort_nb.sort_segments(dx, offsets, False, stream=stream),
                            stream, warmup, repeats)
        record("sort_ragged", "sortgrad-numba", timing, total, 12 * total, agree,
               segments=int(offsets.shape[0] - 1),
               longest=int(np.max(np.diff(offsets))))

    # Top-k.
    x = rng.standard_normal((total // topk_row, topk_row)).astype(np.float32)
    dx = cuda.to_device(x, stream=stream)
    for k in top_ks:
        name = f"top_k{k}"
        if not selected(name, args.only):
            continue
        values, indices = topk_nb.top_k_rows(dx, k, stream=stream)
        want_v, want_i = kernels.top_k(x, k)
        agree = same_bits(values.copy_to_host(), want_v, check_dtype=False) and \
            np.array_equal(indices.copy_to_host(), want_i)
        timing = time_numba(lambda: topk_nb.top_k_rows(dx, k, stream=stream), stream, warmup,
                            repeats)
        record(name, "sortgrad-numba", timing, x.size, 4 * x.size + 8 * k * x.shape[0], agree,
               shape=list(x.shape), k=k)
        for impl, t, ok in baselines("top_k", x, k, warmup, repeats):
            record(name, impl, t, x.size, 4 * x.size + 8 * k * x.shape[0], ok, k=k)

    # Permutation scatter.
    for name, shape in ((f"scatter_rows{topk_row}", (total // topk_row, topk_row)),
                        ("scatter_1row", (1, total))):
        if not selected(name, args.only):
            continue
        values = rng.standard_normal(shape).astype(np.float32)
        perm = np.argsort(rng.random(shape), axis=-1).astype(np.int32)
        dv, dp = cuda.to_device(values, stream=stream), cuda.to_device(perm, stream=stream)
        out = perm_nb.scatter_rows(dv, dp, shape[1], stream=stream)
        agree = same_bits(out.copy_to_host(), kernels.permutation_scatter(values, perm, shape[1]),
                          check_dtype=False)
        timing = time_numba(lambda: perm_nb.scatter_rows(dv, dp, shape[1], stream=stream),
                            stream, warmup, repeats)
        record(name, "sortgrad-numba", timing, values.size, 12 * values.size, agree,
               shape=list(shape))

    # PAV (another module; skipped when absent).
    try:
        from sortgrad.kernels.isotonic import _numba_cuda as iso_nb
    except ImportError:
        iso_nb = None
    pav_shapes = ((4, 32), (1, 128)) if args.smoke else ((4096, 1024), (16, 65536))
    for shape in pav_shapes:
        name = f"pav_l2_{shape[0]}x{shape[1]}"
        if not selected(name, args.only):
            continue
        if iso_nb is None:
            print(f"{name}: skipped (no sortgrad.kernels.isotonic._numba_cuda)")
            continue
        s = -np.sort(-rng.standard_normal(shape).astype(np.float32), axis=-1)
        s = s + rng.standard_normal(shape).astype(np.float32)  # violations to pool
        w = np.arange(shape[1], 0, -1, dtype=np.float32).reshape(1, shape[1])
        ds, dw = cuda.to_device(s, stream=stream), cuda.to_device(w, stream=stream)
        sol, blocks = iso_nb.isotonic_rows(ds, dw, "l2", stream=stream)
        want_sol, want_blocks = kernels.isotonic_regression(s, w[0], regularization="l2")
        agree = bool(np.allclose(sol.copy_to_host(), want_sol, rtol=1e-4, atol=1e-4))
        same_blocks = float(np.mean(blocks.copy_to_host() == want_blocks))
        timing = time_numba(lambda: iso_nb.isotonic_rows(ds, dw, "l2", stream=stream), stream,
                            warmup, repeats)
        record(name, "sortgrad-numba", timing, s.size, 16 * s.size, agree,
               shape=list(shape), equal_block_ids=same_blocks)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (CI; runs on the simulator with lowered constants)")
    parser.add_argument("--only", default="*", help="comma-separated fnmatch patterns of cases")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20)")
    parser.add_argument("--small-constants", action="store_true",
                        help="the simulator's lowered tile/block constants on a GPU too")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 0 if ns.SIMULATOR else 1 if args.smoke else 3
    if args.repeats is None:
        args.repeats = 1 if ns.SIMULATOR else 3 if args.smoke else 20
    if not cuda.is_available():
        print("no CUDA GPU (set NUMBA_ENABLE_CUDASIM=1 for a simulated --smoke run)",
              file=sys.stderr)
        return 2
    result = run(args)
    out = args.out
    if out is None:
        device = device_tag(result["environment"]["device"])
        out = RESULTS / f"gpu-numba-{device}{'-smoke' if args.smoke else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")
    if result["failed_checks"]:
        print("FAILED checks:", ", ".join(result["failed_checks"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
