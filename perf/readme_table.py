"""Prints the README's CPU results table from a bench_cpu.py JSON file.

    python perf/readme_table.py perf/results/cpu-2core-x86.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parent
if str(PERF) not in sys.path:  # perf/_common.py, also when this file is not run as a script
    sys.path.insert(0, str(PERF))

from _common import read_json  # noqa: E402

COLUMNS = [  # (label, pass, baseline impl, header)
    ("soft_rank_l2", "fwd+bwd", "torchsort", "soft_rank L2 f+b"),
    ("soft_rank_kl", "fwd+bwd", "torchsort", "soft_rank KL f+b"),
    ("soft_sort_l2", "fwd+bwd", "torchsort", "soft_sort L2 f+b"),
    ("soft_sort_kl", "fwd+bwd", "torchsort", "soft_sort KL f+b"),
    ("sort", "fwd", "jnp.sort", "sort"),
    ("argsort", "fwd", "jnp.argsort", "argsort"),
    ("top_k", "fwd", "jax.lax.top_k", "top_k(16)"),
]


def cell(records, label, pass_, baseline, shape, dtype):
    def find(impl):
        for r in records:
            if (r["label"] == label or r["label"].startswith(label)) and r["pass"] == pass_ \
                    and r["impl"] == impl and r["shape_str"] == shape and r["dtype"] == dtype:
                return r
        return None
    ours, base = find("sortgrad"), find(baseline)
    if ours is None or base is None:
        return "-"
    a, b = ours["median_ms"], base["median_ms"]
    return f"{a:.2f} / {b:.2f} ({a / b:.2f}x)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    args = parser.parse_args(argv)
    result = read_json(args.json)
    records = result["records"]
    shapes = list(dict.fromkeys(r["shape_str"] for r in records if r["label"] != "overhead"))
    dtypes = list(dict.fromkeys(r["dtype"] for r in records if r["label"] != "overhead"))
    print("| shape | dtype | " + " | ".join(c[3] for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for shape in shapes:
        for dtype in dtypes:
            cells = [cell(records, *c[:3], shape, dtype) for c in COLUMNS]
            print(f"| {shape} | {dtype} | " + " | ".join(cells) + " |")
    over = {r["impl"]: r["median_us"] for r in records if r["label"] == "overhead"}
    if over:
        print(f"\nPer-call cost on 8 elements (jit, median): sortgrad.sort "
              f"{over.get('sortgrad.sort', 0):.1f} us, jnp.sort {over.get('jnp.sort', 0):.1f} us, "
              f"jit(x + 1) {over.get('jit(x+1)', 0):.1f} us.")


if __name__ == "__main__":
    main()
