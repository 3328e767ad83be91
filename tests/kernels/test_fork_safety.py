"""A process forked after the threaded CPU kernels ran can still run every kernel (GNU OpenMP,
Numba's threading layer where it is installed, aborts in such a child: issue 16)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import multiprocessing as mp
    import numpy as np
    import sortgrad.kernels as k
    from sortgrad.kernels._rows import PARALLEL_MIN_ELEMENTS

    x = np.random.default_rng(0).normal(size=(64, 2 * PARALLEL_MIN_ELEMENTS // 64))
    w = np.zeros_like(x)

    def work(_=None):
        values, perm = k.segmented_sort(x)
        top, _ = k.top_k(x, 3)
        solution, _ = k.isotonic_regression(x, w, regularization="l2")
        inverse = k.inverse_permutation(perm)
        return float(values.sum() + top.sum() + solution.sum() + inverse.sum())

    expected = work()  # the threaded kernels run in the parent first
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map(work, range(2), chunksize=1)
    assert got == [expected, expected], (got, expected)
    print("forked children ok")
""")


def test_forked_children_run_the_kernels():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "forked children ok" in result.stdout, (
        result.returncode, result.stdout[-2000:], result.stderr[-2000:])
