"""Side-by-side comparison of two or more bench_cpu.py runs of different checkouts.

    python perf/ab_compare.py old=a1.json,a2.json new=b1.json,b2.json [--out ab.json]

For every sortgrad record (op, label, pass, shape, dtype) present in all runs: the median over
runs of each side's median time, the ratio new/old, and each side's ratio to the baselines
measured in the same runs (jnp / lax). Runs of the two sides should be interleaved (old, new,
old, new) on an otherwise idle machine; the printout gives the geometric-mean ratio.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parent
if str(PERF) not in sys.path:  # perf/_common.py, also when this file is not run as a script
    sys.path.insert(0, str(PERF))

from _common import read_json, write_json  # noqa: E402


def _key(r):
    return (r["op"], r["label"], r["pass"], r["shape_str"], r["dtype"])


def sortgrad_medians(paths):
    """{key: [median_ms per run]} of the sortgrad records of the runs."""
    out: dict = {}
    for path in paths:
        records = read_json(path)["records"]
        for r in records:
            if r["impl"] == "sortgrad":
                out.setdefault(_key(r), []).append(r["median_ms"])
            elif r["op"] == "overhead" and r["impl"] == "jnp.sort":
                out.setdefault(("overhead", "sortgrad.sort", "fwd", "8", r["dtype"]),
                               []).append(r["sortgrad_median_ms"])
    return out


def _environments(paths):
    """Commit, load and versions of each run (the JSON of bench_cpu.py records them)."""
    out = []
    for path in paths:
        d = read_json(path)
        env = d["environment"]
        out.append({"git_commit": env["git_commit"], "git_dirty": env["git_dirty"],
                    "date": env["date"], "cpu_model": env["cpu_model"], "cores": env["cores"],
                    "versions": env["versions"], "loadavg_start": d["loadavg_start"],
                    "only": d["config"]["only"]})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("sides", nargs=2, help="name=run1.json,run2.json (first is the reference)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    (ref_name, ref_paths), (new_name, new_paths) = [
        (s.split("=", 1)[0], s.split("=", 1)[1].split(",")) for s in args.sides]
    ref, new = sortgrad_medians(ref_paths), sortgrad_medians(new_paths)
    rows, logs = [], []
    for key in sorted(set(ref) & set(new)):
        a, b = statistics.median(ref[key]), statistics.median(new[key])
        rows.append({"key": key, ref_name + "_ms": a, new_name + "_ms": b, "ratio": b / a})
        logs.append(math.log(b / a))
        print(f"{' '.join(key):60s} {a:9.3f} {b:9.3f}  {b / a:5.2f}x")
    geo = math.exp(sum(logs) / len(logs))
    print(f"geometric mean {new_name}/{ref_name}: {geo:.3f} over {len(rows)} records")
    if args.out:
        write_json(args.out, {"reference": ref_paths, "new": new_paths, "geomean_ratio": geo,
                              "rows": rows})


if __name__ == "__main__":
    main()
