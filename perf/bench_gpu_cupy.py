"""GPU benchmark of the CuPy backend (CUDA C kernels compiled with NVRTC) against the GPU sorts,
top-k and soft ranks of CuPy, JAX, torch and torchsort.

Cases (float32; "2^24" = 16,777,216 elements in all):
  sort_rows32 / sort_rows1024 / sort_rows4096  segmented sort of 2^24 in rows of 32/1024/4096
  sort_ragged                                  2^24 in CSR segments of mixed lengths (mostly
                                               short, some medium, a few long; fixed seed)
  top_k1 / top_k16 / top_k64 / top_k256        top-k of 2^24 in rows of 4096
  scatter_rows4096 / scatter_1row              permutation scatter of 2^24 (rows of 4096: the
                                               shared-memory path; one row: the direct path)
  inverse_rows4096                             inverse permutation of 2^24 in rows of 4096
  pav_l2_4096x1024 / pav_l2_16x65536           isotonic_rows("l2") of sortgrad's CuPy PAV
                                               (sortgrad.kernels.isotonic._cupy, when present)
                                               on soft-rank inputs, and the whole soft rank
                                               (sort + PAV + scatter) "soft_rank_l2_*"
Baselines, when importable and on the GPU: cupy.sort / cupy.argsort, jnp.sort /
jax.lax.top_k (jitted), torch.sort(stable=True) / torch.topk, torchsort.soft_rank (CUDA).
Target: the PAV at least 10x faster than torchsort's soft_rank at both PAV shapes (the
"speedup_vs_torchsort" field).

Every sortgrad result is first checked against the CPU backend (sort, top-k, permutations:
exact, bits and indices; PAV: solution within rtol 1e-4 and the fraction of equal block ids)
and so are the baselines where comparable. Timing: `--warmup` untimed calls, then `--repeats`
calls each timed with CUDA events on the current stream (JAX: wall clock around
block_until_ready). Reported: median / p25 / p75 / min ms, elements/s, and the fraction of the
measured device-to-device copy bandwidth reached by each case's minimal traffic (bytes it must
read and write once, e.g. sort: keys in, values and int32 perm out). JSON (device, driver,
runtime and library versions, git commit, every record) goes to
perf/results/gpu-cupy-<device>.json unless --out is given; exit status 1 if a check failed.

  python perf/bench_gpu_cupy.py                      # full run (needs a CUDA GPU)
  python perf/bench_gpu_cupy.py --only 'top_k*'      # a subset (fnmatch on case names)
  python perf/bench_gpu_cupy.py --smoke              # tiny sizes, a few seconds
Without CuPy or a CUDA GPU the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parent
if str(PERF) not in sys.path:  # perf/_common.py, also when this file is not run as a script
    sys.path.insert(0, str(PERF))

from _common import (RESULTS, bandwidth_fraction, copy_bandwidth, cupy_device_info,  # noqa: E402
                     device_tag, git_info, jax_on_gpu, module_version, nvidia_smi, selected,
                     time_cupy, time_torch, time_wall, torch_cuda, utc_now, write_json)

import numpy as np  # noqa: E402

TOTAL = 1 << 24
SMOKE_TOTAL = 1 << 14
TOP_KS = (1, 16, 64, 256)
PAV_SHAPES = ((4096, 1024), (16, 65536))
SMOKE_PAV_SHAPES = ((64, 256), (2, 4096))


def gpu_unavailable() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install sortgrad[cuda12] or sortgrad[cuda13])"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception as err:  # no driver
        return f"no CUDA GPU/driver ({type(err).__name__}: {err})"
    return "no CUDA GPU"


def environment(cupy) -> dict:
    dev = cupy_device_info(cupy)
    try:
        from cuda.bindings import nvrtc
        _, major, minor = nvrtc.nvrtcVersion()
        nvrtc_version = f"{major}.{minor}"
    except Exception:
        nvrtc_version = None
    return {
        **git_info(),
        "date": utc_now(),
        "python": platform.python_version(), "platform": platform.platform(),
        "device": dev["name"],
        "compute_capability": dev["compute_capability"],
        "multiprocessors": dev["multiprocessors"],
        "driver_version": dev["driver_version"],
        "runtime_version": dev["cuda_runtime_version"],
        "nvrtc_version": nvrtc_version,
        "nvidia_smi": nvidia_smi("name,driver_version,clocks.max.sm,memory.total"),
        "versions": {m: module_version(m) for m in ("numpy", "cupy", "jax", "jaxlib", "torch",
                                                    "torchsort")},
    }


# --- timing -------------------------------------------------------------------------------------

def cupy_copy_bandwidth(cupy, nbytes: int, warmup: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = cupy.ones(nbytes // 4, dtype=np.float32)
    dst = cupy.empty_like(src)
    timing = time_cupy(cupy, lambda: cupy.copyto(dst, src), warmup, repeats)
    return copy_bandwidth(src.nbytes, timing["median_ms"] * 1e-3)


# --- the run ----------------------------------------------------------------------------------

def ragged_offsets(total: int, rng) -> np.ndarray:
    """Mostly short segments (1..64), some medium (65..4096), a few long (up to total/16)."""
    lengths, used = [], 0
    while used < total:
        u = rng.random()
        if u < 0.9:
            length = int(rng.integers(1, 65))
        elif u < 0.999:
            length = int(rng.integers(65, 4097))
        else:
            length = int(rng.integers(4097, max(4098, total // 16)))
        length = min(length, total - used)
        lengths.append(length)
        used += length
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def run(args) -> dict:
    import cupy

    from sortgrad.kernels.permutation import _cpu as perm_cpu
    from sortgrad.kernels.permutation import _cupy as perm_cupy
    from sortgrad.kernels.segmented_sort import _cpu as sort_cpu
    from sortgrad.kernels.segmented_sort import _cupy as sort_cupy
    from sortgrad.kernels.top_k import _cpu as topk_cpu
    from sortgrad.kernels.top_k import _cupy as topk_cupy
    from sortgrad.testing import same_bits  # same shape, dtype and bytes

    total = SMOKE_TOTAL if args.smoke else TOTAL
    warmup, repeats = args.warmup, args.repeats
    rng = np.random.default_rng(0)
    result = {"environment": environment(cupy), "total_elements": total, "records": [],
              "failed_checks": [], "smoke": bool(args.smoke)}
    bandwidth = cupy_copy_bandwidth(cupy, 1 << 28 if not args.smoke else 1 << 22, warmup,
                                    repeats)
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    jax, torch = jax_on_gpu(), torch_cuda()

    def record(case, impl, timing, elements, min_bytes, agree, **extra):
        seconds = timing["median_ms"] * 1e-3
        rec = dict(case=case, impl=impl, agree=bool(agree), elements=int(elements),
                   elements_per_s=elements / seconds,
                   fraction_of_copy_bandwidth=bandwidth_fraction(min_bytes, seconds, bandwidth),
                   **timing, **extra)
        result["records"].append(rec)
        if not agree and impl.startswith("sortgrad"):
            result["failed_checks"].append(f"{case}/{impl}")
        print(f"{case:>22} {impl:>26} {timing['median_ms']:9.3f} ms "
              f"{elements / seconds / 1e9:7.2f} Gelem/s  agree={agree}", flush=True)
        return rec

    # sort ------------------------------------------------------------------------------------
    for row in (32, 1024, 4096):
        case = f"sort_rows{row}"
        if not selected(case, args.only):
            continue
        x = rng.standard_normal((total // row, row)).astype(np.float32)
        xd = cupy.asarray(x)
        want_v, want_p = sort_cpu.sort_rows(x, False)
        got_v, got_p = sort_cupy.sort_rows(xd, False)
        agree = same_bits(got_v.get(), want_v) and np.array_equal(got_p.get(), want_p)
        record(case, "sortgrad-cupy", time_cupy(cupy, lambda: sort_cupy.sort_rows(xd, False),
                                                warmup, repeats), x.size, 12 * x.size, agree)
        ok = same_bits(cupy.sort(xd, axis=-1).get(), want_v)
        record(case, "cupy.sort", time_cupy(cupy, lambda: cupy.sort(xd, axis=-1), warmup,
                                            repeats), x.size, 8 * x.size, ok)
        ok = np.array_equal(cupy.argsort(xd, axis=-1).get(), want_p)  # not stable: may differ
        record(case, "cupy.argsort", time_cupy(cupy, lambda: cupy.argsort(xd, axis=-1), warmup,
                                               repeats), x.size, 8 * x.size, ok)
        if jax is not None:
            import jax.numpy as jnp
            xj = jax.device_put(x, jax.devices("gpu")[0])
            fn = jax.jit(lambda a: jax.lax.sort((a, jax.lax.broadcasted_iota(
                jnp.int32, a.shape, 1)), num_keys=1, is_stable=True))
            res = jax.block_until_ready(fn(xj))
            ok = same_bits(np.asarray(res[0]), want_v) and np.array_equal(np.asarray(res[1]),
                                                                           want_p)
            record(case, "jax.lax.sort(values, iota)",
                   time_wall(lambda: fn(xj), jax.block_until_ready, warmup, repeats), x.size,
                   12 * x.size, ok)
            fs = jax.jit(jnp.sort)
            ok = same_bits(np.asarray(fs(xj)), want_v)
            record(case, "jnp.sort", time_wall(lambda: fs(xj), jax.block_until_ready, warmup,
                                               repeats), x.size, 8 * x.size, ok)
        if torch is not None:
            xt = torch.as_tensor(x, device="cuda")
            res = torch.sort(xt, dim=-1, stable=True)
            ok = same_bits(res[0].cpu().numpy(), want_v) and np.array_equal(
                res[1].cpu().numpy(), want_p)
            record(case, "torch.sort(stable)",
                   time_torch(torch, lambda: torch.sort(xt, dim=-1, stable=True), warmup,
                              repeats), x.size, 16 * x.size, ok)

    if selected("sort_ragged", args.only):
        offsets = ragged_offsets(total, rng)
        x = rng.standard_normal(total).astype(np.float32)
        xd = cupy.asarray(x)
        want_v, want_p = sort_cpu.sort_segments(x, offsets, False)
        got_v, got_p = sort_cupy.sort_segments(xd, offsets, False)
        agree = same_bits(got_v.get(), want_v) and np.array_equal(got_p.get(), want_p)
        record("sort_ragged", "sortgrad-cupy",
               time_cupy(cupy, lambda: sort_cupy.sort_segments(xd, offsets, False), warmup,
                         repeats), total, 12 * total, agree, segments=int(offsets.size - 1))

    # top-k -----------------------------------------------------------------------------------
    x = rng.standard_normal((total // 4096, 4096)).astype(np.float32)
    xd = cupy.asarray(x)
    for k in TOP_KS:
        case = f"top_k{k}"
        if not selected(case, args.only):
            continue
        want_v, want_i = topk_cpu.top_k_rows(x, k)
        got_v, got_i = topk_cupy.top_k_rows(xd, k)
        agree = same_bits(got_v.get(), want_v) and np.array_equal(got_i.get(), want_i)
        record(case, "sortgrad-cupy", time_cupy(cupy, lambda: topk_cupy.top_k_rows(xd, k),
                                                warmup, repeats), x.size, 4 * x.size, agree)
        if jax is not None:
            xj = jax.device_put(x, jax.devices("gpu")[0])
            fn = jax.jit(lambda a: jax.lax.top_k(a, k))
            res = jax.block_until_ready(fn(xj))
            ok = np.array_equal(np.asarray(res[1]), want_i)
            record(case, "jax.lax.top_k", time_wall(lambda: fn(xj), jax.block_until_ready,
                                                    warmup, repeats), x.size, 4 * x.size, ok)
        if torch is not None:
            xt = torch.as_tensor(x, device="cuda")
            ok = np.array_equal(torch.topk(xt, k, dim=-1)[1].cpu().numpy(), want_i)
            record(case, "torch.topk", time_torch(torch, lambda: torch.topk(xt, k, dim=-1),
                                                  warmup, repeats), x.size, 4 * x.size, ok)

    # permutations ----------------------------------------------------------------------------
    for case, shape in (("scatter_rows4096", (total // 4096, 4096)), ("scatter_1row", (1, total))):
        if not selected(case, args.only):
            continue
        perm = np.argsort(rng.random(shape), axis=-1).astype(np.int32)
        values = rng.standard_normal(shape).astype(np.float32)
        pd, vd = cupy.asarray(perm), cupy.asarray(values)
        n = shape[1]
        agree = same_bits(perm_cupy.scatter_rows(vd, pd, n).get(),
                            perm_cpu.scatter_rows(values, perm, n))
        record(case, "sortgrad-cupy", time_cupy(cupy, lambda: perm_cupy.scatter_rows(vd, pd, n),
                                                warmup, repeats), values.size, 12 * values.size,
               agree)
        out = cupy.zeros(shape, np.float32)
        rows_idx = cupy.arange(shape[0])[:, None]

        def fancy():
            out[rows_idx, pd] = vd
        fancy()
        record(case, "cupy fancy-index scatter", time_cupy(cupy, fancy, warmup, repeats),
               values.size, 12 * values.size,
               same_bits(out.get(), perm_cpu.scatter_rows(values, perm, n)))
    if selected("inverse_rows4096", args.only):
        perm = np.argsort(rng.random((total // 4096, 4096)), axis=-1).astype(np.int32)
        pd = cupy.asarray(perm)
        agree = np.array_equal(perm_cupy.inverse_rows(pd).get(), perm_cpu.inverse_rows(perm))
        record("inverse_rows4096", "sortgrad-cupy",
               time_cupy(cupy, lambda: perm_cupy.inverse_rows(pd), warmup, repeats), perm.size,
               8 * perm.size, agree)
        record("inverse_rows4096", "cupy.argsort",
               time_cupy(cupy, lambda: cupy.argsort(pd, axis=-1), warmup, repeats), perm.size,
               8 * perm.size, np.array_equal(cupy.argsort(pd, axis=-1).get(),
                                             perm_cpu.inverse_rows(perm)))

    # PAV and soft rank -----------------------------------------------------------------------
    try:
        from sortgrad.kernels.isotonic import _cpu as iso_cpu
        from sortgrad.kernels.isotonic import _cupy as iso_cupy
    except ImportError:
        iso_cupy = None
    torchsort = None
    if torch is not None:
        try:
            import torchsort
        except ImportError:
            torchsort = None
    for rows, n in (SMOKE_PAV_SHAPES if args.smoke else PAV_SHAPES):
        case = f"pav_l2_{rows}x{n}"
        if iso_cupy is None or not selected(case, args.only):
            continue
        # soft-rank inputs (strength 1): z sorted descending, anchors rho = n..1, spread so
        # that PAV pools some runs and leaves others
        x = (rng.standard_normal((rows, n)) * n / 8).astype(np.float32)
        z = -np.sort(-x, axis=-1)
        rho = np.arange(n, 0, -1, dtype=np.float32)[None, :]
        zd, rd, xd = cupy.asarray(z), cupy.asarray(rho), cupy.asarray(x)
        want_sol, want_blocks = iso_cpu.isotonic_rows(z, rho, "l2")
        got_sol, got_blocks = iso_cupy.isotonic_rows(zd, rd, "l2")
        got_sol, got_blocks = got_sol.get(), got_blocks.get()
        agree = bool(np.allclose(got_sol, want_sol, rtol=1e-4,
                                 atol=1e-4 * float(np.abs(want_sol).max())))
        same_blocks = float(np.mean(got_blocks == want_blocks))
        pav = record(case, "sortgrad-cupy PAV",
                     time_cupy(cupy, lambda: iso_cupy.isotonic_rows(zd, rd, "l2"), warmup,
                               repeats), z.size, 12 * z.size, agree,
                     equal_block_ids=same_blocks,
                     blocks_per_row=float((want_blocks[:, -1] + 1).mean()))

        def soft_rank():  # ascending soft rank at strength 1: sort, PAV, scatter
            s, sigma = sort_cupy.sort_rows(xd, True)
            v, _ = iso_cupy.isotonic_rows(s, rd, "l2")
            return perm_cupy.scatter_rows(s - v, sigma, n)
        s_cpu, sigma_cpu = sort_cpu.sort_rows(x, True)
        want_rank = perm_cpu.scatter_rows(s_cpu - iso_cpu.isotonic_rows(s_cpu, rho, "l2")[0],
                                          sigma_cpu, n)
        ok = bool(np.allclose(soft_rank().get(), want_rank, rtol=1e-4, atol=1e-4 * n))
        composed = record(f"soft_rank_l2_{rows}x{n}", "sortgrad-cupy sort+PAV+scatter",
                          time_cupy(cupy, soft_rank, warmup, repeats), x.size, 24 * x.size, ok)
        if torchsort is not None:
            xt = torch.as_tensor(x, device="cuda")
            try:
                ts = time_torch(torch, lambda: torchsort.soft_rank(
                    xt, regularization_strength=1.0), warmup, repeats)
            except Exception as err:  # a torchsort build without its CUDA extension
                result.setdefault("notes", []).append(f"torchsort CUDA: {err}")
                continue
            ours = soft_rank().get()
            theirs = torchsort.soft_rank(xt, regularization_strength=1.0).cpu().numpy()
            ok = bool(np.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * n))
            rec = record(f"soft_rank_l2_{rows}x{n}", "torchsort.soft_rank", ts, x.size,
                         24 * x.size, ok)
            pav["speedup_vs_torchsort"] = rec["median_ms"] / pav["median_ms"]
            composed["speedup_vs_torchsort"] = rec["median_ms"] / composed["median_ms"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a few seconds)")
    parser.add_argument("--only", default="*", help="comma-separated fnmatch patterns of cases")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 3
    if args.repeats is None:
        args.repeats = 3 if args.smoke else 20
    reason = gpu_unavailable()
    if reason:
        print(f"bench_gpu_cupy: cannot run: {reason}. This benchmark needs CuPy and a CUDA "
              "GPU; nothing was measured.", file=sys.stderr)
        return 2
    result = run(args)
    out = args.out
    if out is None:
        device = device_tag(result["environment"]["device"])
        out = RESULTS / f"gpu-cupy-{device}{'-smoke' if args.smoke else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")
    if result["failed_checks"]:
        print("FAILED checks:", ", ".join(result["failed_checks"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
