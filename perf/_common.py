"""Helpers shared by the benchmark scripts in perf/: environment, timers, statistics, JSON.

One place per helper; every script imports what it needs (`from _common import ...`, with
perf/ put on sys.path by the script itself, so that it works however the script is started).

Importing this module puts this checkout's root first on sys.path: the scripts benchmark the
sortgrad of this checkout, also when it is not pip-installed (import _common before sortgrad).
Only the standard library and NumPy are imported here; JAX, Numba, CuPy and torch are imported
inside the functions that need them (or passed in), so that every script pays only for what it
uses.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PERF = Path(__file__).resolve().parent
REPO = PERF.parent
RESULTS = PERF / "results"

if str(REPO) not in sys.path:  # benchmark this checkout, also when it is not pip-installed
    sys.path.insert(0, str(REPO))


# --- environment ----------------------------------------------------------------------------

def run_command(*args: str, timeout: float = 15) -> str | None:
    """Stripped stdout of `args` run in the repository root; None when the command is missing,
    fails (non-zero exit) or runs longer than `timeout` seconds. An empty output is ""."""
    try:
        return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_info() -> dict:
    """{"git_commit": HEAD's hash or None, "git_dirty": True / False, None without git}."""
    status = run_command("git", "status", "--porcelain")
    return {"git_commit": run_command("git", "rev-parse", "HEAD") or None,
            "git_dirty": None if status is None else bool(status)}


def nvidia_smi(fields: str) -> str | None:
    """`nvidia-smi --query-gpu=<fields> --format=csv,noheader` output; None without it."""
    return run_command("nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader") or None


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second, e.g. 2026-12-01T10:00:00+00:00."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def dist_version(name: str) -> str | None:
    """The installed version of distribution `name` (importlib.metadata); None if absent."""
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def module_version(module: str) -> str | None:
    """`__version__` of the imported module `module` (it is imported: "cupy" names no
    distribution, cupy-cuda12x / cupy-cuda13x do), else its distribution's version; None if
    neither exists."""
    try:
        return __import__(module).__version__
    except Exception:
        return dist_version(module)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else platform.processor() or the machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The number of CPU cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages; None where the OS has none."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def host_tag() -> str:
    """The short host name made safe for a file name (runs of other characters -> "-")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname().split(".")[0]) or "host"


def device_tag(name) -> str:
    """A device name as a file-name tag: lower case, characters other than letters, digits
    and ._- replaced by "-" (e.g. "NVIDIA H200" -> "nvidia-h200")."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in str(name).lower())


def sortgrad_info() -> dict:
    """{"version", "path"} of the sortgrad that imports, or {"error": repr} if none does."""
    try:
        import sortgrad
        return {"version": getattr(sortgrad, "__version__", None), "path": sortgrad.__file__}
    except Exception as e:  # pragma: no cover - reported, not fatal
        return {"error": repr(e)}


def sortgrad_callback_mode() -> str | None:
    """sortgrad.get_callback_mode(), or None when sortgrad or the function is missing."""
    try:
        import sortgrad
        return sortgrad.get_callback_mode()
    except Exception:
        return None


def cpu_environment(torch_mod=None, torch_threads=None) -> dict:
    """The environment of a CPU benchmark run as a JSON-ready dict: git commit and dirty flag,
    host, CPU model, usable cores, platform, date, library versions (python, numpy, jax,
    jaxlib, numba, torch, torchsort, sortgrad), JAX backend and devices, Numba and torch
    thread counts, sortgrad's callback mode and the relevant environment variables."""
    import jax
    import numba
    return {
        **git_info(),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "platform": platform.platform(),
        "date": utc_now(),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "jax": jax.__version__,
            "jaxlib": dist_version("jaxlib"),
            "numba": numba.__version__,
            "torch": getattr(torch_mod, "__version__", None),
            "torchsort": dist_version("torchsort"),
            "sortgrad": sortgrad_info(),
        },
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch_threads,
        "sortgrad_callback_mode": sortgrad_callback_mode(),
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
                                           "SORTGRAD_CALLBACK") if k in os.environ},
    }


def _decode(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def cupy_device_info(cupy) -> dict:
    """Facts of CuPy's current device: name, compute_capability ("9.0"), multiprocessors,
    l2_bytes, total_memory (bytes), driver_version, cuda_runtime_version (CUDA's integers)."""
    dev = cupy.cuda.Device()
    attrs = dev.attributes
    p = cupy.cuda.runtime.getDeviceProperties(dev.id)
    return {"name": _decode(p["name"]),
            "compute_capability": f"{p['major']}.{p['minor']}",
            "multiprocessors": attrs.get("MultiProcessorCount", p.get("multiProcessorCount")),
            "l2_bytes": attrs.get("L2CacheSize"),
            "total_memory": dev.mem_info[1],
            "driver_version": cupy.cuda.runtime.driverGetVersion(),
            "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion()}


def gpu_props(platform_name: str) -> dict:
    """Device facts for the JSON, {} unless `platform_name` is "gpu": those of
    `cupy_device_info` plus l2_source ("cupy"); where CuPy gives no L2 size, torch's
    (l2_source "torch"). An import or driver error is recorded as cupy_error / torch_error."""
    props = {}
    if platform_name != "gpu":
        return props
    try:
        import cupy
        info = cupy_device_info(cupy)
        props.update(name=info["name"], compute_capability=info["compute_capability"],
                     multiprocessors=info["multiprocessors"], l2_bytes=info["l2_bytes"],
                     l2_source="cupy", total_memory=info["total_memory"],
                     driver_version=info["driver_version"],
                     cuda_runtime_version=info["cuda_runtime_version"])
    except Exception as err:
        props["cupy_error"] = repr(err)[:300]
    if not props.get("l2_bytes"):
        try:
            import torch
            if torch.cuda.is_available():
                tp = torch.cuda.get_device_properties(0)
                l2 = getattr(tp, "L2_cache_size", None)
                if l2:
                    props.update(l2_bytes=int(l2), l2_source="torch")
                props.setdefault("name", tp.name)
        except Exception as err:
            props["torch_error"] = repr(err)[:300]
    return props


def jax_on_gpu():
    """The jax module when JAX sees a GPU, else None."""
    try:
        import jax
        return jax if jax.devices("gpu") else None
    except Exception:
        return None


def torch_cuda():
    """The torch module when torch sees a CUDA device, else None."""
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


# --- timers ---------------------------------------------------------------------------------

def timing_stats(values, *, unit: str = "ms", count_key: str = "n", iqr: bool = False) -> dict:
    """Summary of timings already in `unit`: {"median_<unit>", ["iqr_<unit>" (p75 - p25) when
    `iqr`], "p25_<unit>", "p75_<unit>", "min_<unit>", count_key: number of values}, floats."""
    a = np.asarray(values, dtype=np.float64)
    p25, p75 = (float(v) for v in np.percentile(a, [25, 75]))
    out = {f"median_{unit}": float(np.median(a))}
    if iqr:
        out[f"iqr_{unit}"] = p75 - p25
    out.update({f"p25_{unit}": p25, f"p75_{unit}": p75, f"min_{unit}": float(a.min()),
                count_key: int(a.size)})
    return out


def time_wall(call, sync, warmup: int, repeats: int) -> dict:
    """`warmup` untimed then `repeats` timed `sync(call())`, wall clock (perf_counter) around
    each: timing_stats in ms plus timer "wall + block_until_ready"."""
    for _ in range(warmup):
        sync(call())
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(call())
        ms.append((time.perf_counter() - t0) * 1e3)
    return dict(timing_stats(ms), timer="wall + block_until_ready")


def time_cupy(cupy, call, warmup: int, repeats: int, *,
                     timer: str = "cuda events") -> dict:
    """CuPy CUDA events on the current stream around each of `repeats` calls (after `warmup`
    untimed ones; kernels and allocations count): timing_stats in ms plus `timer`."""
    for _ in range(warmup):
        call()
    cupy.cuda.get_current_stream().synchronize()
    ms = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        call()
        end.record()
        end.synchronize()
        ms.append(cupy.cuda.get_elapsed_time(start, end))
    return dict(timing_stats(ms), timer=timer)


def time_torch(torch, call, warmup: int, repeats: int) -> dict:
    """torch CUDA events around each of `repeats` calls (after `warmup` untimed ones):
    timing_stats in ms plus timer "torch cuda events"."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    ms = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        ms.append(start.elapsed_time(end))
    return dict(timing_stats(ms), timer="torch cuda events")


def copy_bandwidth(nbytes: float, seconds: float) -> float:
    """Bytes/s of a copy of `nbytes` that took `seconds`, read and write counted (2 * nbytes)."""
    return 2 * nbytes / seconds


def bandwidth_fraction(min_bytes, seconds: float, bandwidth) -> float | None:
    """(min_bytes / seconds) / bandwidth: the fraction of the copy bandwidth that a case's
    minimal traffic reaches; None without min_bytes or a finite, nonzero bandwidth."""
    if not min_bytes or not bandwidth or bandwidth != bandwidth:
        return None
    return (min_bytes / seconds) / bandwidth


# --- cases and checks -----------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, ...]:
    """"1024x1000" -> (1024, 1000); argparse.ArgumentTypeError for anything else (usable as
    an argparse `type`)."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}, want e.g. 1024x1000") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}")
    return shape


def format_shape(shape) -> str:
    """(1024, 1000) -> "1024x1000"."""
    return "x".join(map(str, shape))


def selected(name: str, patterns) -> bool:
    """Whether case `name` matches one of the fnmatch `patterns` (case-sensitive): a
    comma-separated string or a list; None or an empty list selects everything."""
    if patterns is None:
        return True
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def tie_group_mean(g, x, rows: int | None = None):
    """g (float64) with each entry replaced by the mean of g over the entries of its row (last
    axis) that tie exactly in x. All rows in g's shape, or, with `rows`, only the first `rows`
    rows as a 2-D array.

    At exactly tied inputs the soft/hard sort is not differentiable and implementations split
    the cotangent by their own tie convention (sortgrad: stable, as jnp.sort; torchsort:
    whatever torch.sort(descending=True) of -x does). The sum over a tie group is the same for
    every convention, so gradients are compared after this averaging.
    """
    n = np.shape(x)[-1]
    g2 = np.asarray(g, dtype=np.float64).reshape(-1, n)
    x2 = np.asarray(x).reshape(-1, n)
    if rows is not None:
        g2, x2 = g2[:rows], x2[:rows]
    out = np.empty_like(g2)
    for r in range(x2.shape[0]):
        _, inv, counts = np.unique(x2[r], return_inverse=True, return_counts=True)
        if counts.size == n:
            out[r] = g2[r]
        else:
            out[r] = (np.bincount(inv, weights=g2[r], minlength=counts.size) / counts)[inv]
    return out if rows is not None else out.reshape(np.shape(g))


# --- JSON -----------------------------------------------------------------------------------

def json_default(o):
    """`default` for json.dumps: NumPy integers / floats / bools -> int / float / bool, arrays
    -> lists, anything else (paths, devices, ...) -> str(o)."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_json(path, obj) -> Path:
    """Writes `obj` as indented JSON (json_default for NumPy values) to `path`, creating its
    folder; through a temporary file and a rename, so that a reader (or a kill) never sees a
    half-written file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=json_default) + "\n")
    tmp.replace(path)
    return path


def read_json(path):
    """The JSON document in the file `path`."""
    with open(path) as f:
        return json.load(f)
