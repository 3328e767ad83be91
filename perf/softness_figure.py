"""The README's softness figure: soft rank, soft quantiles and the soft top-k mask against the
hard ops, on standard-normal rows of n = 10, 1000 and 10^5 overlaid (the curves coincide:
the softness is scale-free and n-free).

    python perf/softness_figure.py                 # writes docs/softness.png
    python perf/softness_figure.py --smoke --out /tmp/s.png   # tiny sizes (tests)

Top row, at each op's default softness, against the standardised data u = (x - mean) / std
(one row of each n): L2 and KL soft rank / n with the hard rank / n; the soft quantile
function (the soft sort) with the hard one; the mask for k = n / 4 with the hard mask.
Bottom row, over a range of softness (log axis; grey: the default; averaged over rows): the
L2 rank's mean |soft - hard| / n and its fraction of pooled entries (those away from their
hard rank: the entries with a nonzero gradient); (soft - hard quantile) / std at q = 0.1,
0.5, 0.9; the size of the pooled block at q, as a fraction of n (1 / n: the hard quantile,
whose gradient sits on 2 entries); the fraction of fractional mask entries.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = {10: 400, 1000: 8, 100000: 1}  # n: rows (averaged)
SMOKE_SIZES = {10: 4, 100: 1}
QS = (0.1, 0.5, 0.9)


def _block_fraction(kernels, x, eps, qs):
    """The size of the soft sort's pooled block at each position q * (n - 1), over n."""
    n = x.shape[-1]
    _, _, blocks = kernels.soft_sort(x[None], eps)
    _, inverse, counts = np.unique(blocks[0], return_inverse=True, return_counts=True)
    return counts[inverse][np.floor(np.asarray(qs) * (n - 1)).astype(int)] / n


def _curves(sortgrad, sizes, grid):
    """The measurements the panels plot, per n."""
    rng = np.random.default_rng(0)
    out = {}
    for n, rows in sizes.items():
        x = rng.standard_normal((rows, n))
        mean, sd = x.mean(-1, keepdims=True), x.std(-1, keepdims=True)
        order = np.argsort(x, -1)
        hard = np.argsort(order, -1) + 1.0
        k = max(1, n // 4)

        def first_sorted(values):
            return np.take_along_axis(np.asarray(values), order, -1)[0]
        top = {
            "u": first_sorted((x - mean) / sd),
            "rank": first_sorted(sortgrad.soft_rank(x)) / n,
            "rank_kl": first_sorted(sortgrad.soft_rank(x, regularization="kl")) / n,
            "hard_rank": np.arange(1, n + 1) / n,
            "sort": ((np.asarray(sortgrad.soft_sort(x)) - mean) / sd)[0],
            "mask": first_sorted(sortgrad.soft_top_k_mask(x, k)),
            "hard_mask": (np.arange(n) >= n - k).astype(float),
        }
        sweep = {"rank_dev": [], "rank_pooled": [], "q": [], "block": [], "mask": []}
        hard_q = np.quantile(x, QS, axis=-1)
        for s in grid:
            r = np.asarray(sortgrad.soft_rank(x, softness=4.0 * s))
            sweep["rank_dev"].append(np.mean(np.abs(r - hard)) / n)
            sweep["rank_pooled"].append(np.mean(np.abs(r - hard) > 1e-9))
            q = np.asarray(sortgrad.soft_quantile(x, QS, softness=0.3 * s))
            sweep["q"].append(np.mean((q - hard_q) / sd[:, 0], axis=1))
            sweep["block"].append(np.mean([  # the law in NumPy: eps = s n / std
                _block_fraction(sortgrad.kernels, row, 0.3 * s * n / row.std(), QS)
                for row in x], axis=0))
            m = np.asarray(sortgrad.soft_top_k_mask(x, k, softness=1.0 * s))
            sweep["mask"].append(np.mean((m > 1e-9) & (m < 1 - 1e-9)))
        out[n] = (top, {key: np.asarray(v) for key, v in sweep.items()})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "softness.png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a coarse grid")
    args = parser.parse_args(argv)

    import jax
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sortgrad
    jax.config.update("jax_enable_x64", True)

    grid = np.geomspace(1 / 16, 16, 5 if args.smoke else 25)  # multiples of each default
    data = _curves(sortgrad, SMOKE_SIZES if args.smoke else SIZES, grid)
    styles = dict(zip(data, [dict(ls=":", lw=2.2), dict(ls="--", lw=1.6),
                             dict(ls="-", lw=1.0)]))
    colours = ["tab:blue", "tab:orange", "tab:green"]
    blue = "tab:blue"

    fig, ax = plt.subplots(2, 4, figsize=(17, 7.6))
    for n, (top, sweep) in data.items():
        st = styles[n]
        positions = np.arange(1, n + 1) / (n + 1)
        ax[0, 0].plot(top["u"], top["rank"], color=blue, **st)
        ax[0, 1].plot(top["u"], top["rank_kl"], color=blue, **st)
        ax[0, 2].plot(positions, top["sort"], color=blue, **st)
        ax[0, 3].plot(top["u"], top["mask"], color=blue, **st)
        ax[1, 0].plot(grid * 4.0, sweep["rank_dev"], color=blue, **st)
        ax[1, 0].plot(grid * 4.0, sweep["rank_pooled"], color="tab:red", **st)
        for i, _ in enumerate(QS):
            ax[1, 1].plot(grid * 0.3, sweep["q"][:, i], color=colours[i], **st)
            ax[1, 2].plot(grid * 0.3, sweep["block"][:, i], color=colours[i], **st)
        ax[1, 3].plot(grid, sweep["mask"], color=blue, **st)
    big = data[max(data)][0]
    hard = dict(color="k", lw=0.8)
    ax[0, 0].plot(big["u"], big["hard_rank"], **hard)
    ax[0, 1].plot(big["u"], big["hard_rank"], **hard)
    ax[0, 2].plot(np.arange(1, len(big["u"]) + 1) / (len(big["u"]) + 1), big["u"], **hard)
    ax[0, 3].plot(big["u"], big["hard_mask"], **hard)
    titles = [["soft_rank / n, L2 (default softness 4)", "soft_rank / n, KL (default 1)",
               "soft_sort: the quantile function (L2, default 0.3)",
               "soft_top_k_mask, k = n/4 (default 1)"],
              ["L2 rank, eps = s std / n: blue mean |soft - hard| / n,\n"
               "red fraction pooled (nonzero gradient)",
               "soft_quantile, eps = s n / std:\n(soft - hard) / std",
               "soft_quantile: pooled block at q / n\n(1/n: hard, gradient on 2 entries)",
               "mask, eps = s std: fraction fractional"]]
    xlabels = [["u = (x - mean) / std", "u = (x - mean) / std", "q", "u = (x - mean) / std"],
               ["softness"] * 4]
    defaults = [4.0, 0.3, 0.3, 1.0]
    for r in range(2):
        for c in range(4):
            a = ax[r, c]
            a.set_title(titles[r][c], fontsize=9.5)
            a.set_xlabel(xlabels[r][c], fontsize=9)
            a.grid(alpha=0.3)
            if r == 1:
                a.set_xscale("log")
                a.axvline(defaults[c], color="grey", lw=0.8)
    ax[1, 2].set_yscale("log")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color="grey", **styles[n]) for n in data]
    handles += [Line2D([], [], **hard)]
    handles += [Line2D([], [], color=c, lw=1.5) for c in colours]
    fig.legend(handles, [f"n = {n:g}" for n in data] + ["hard op"]
               + [f"q = {q}" for q in QS], loc="lower center", ncol=len(handles),
               fontsize=9, frameon=False)
    fig.suptitle("sortgrad soft ops on standard-normal rows at the default strength and over a "
                 "range of softness: the same relative softness at every n", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72 if args.smoke else 80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
