"""Row-parallel Numba kernels that stay cheap to call on tiny inputs.

A `parallel=True` kernel pays for waking its thread pool on every call (tens of microseconds;
~100 us with OMP_WAIT_POLICY=PASSIVE, where the pool sleeps between calls), which dominates
small inputs. `row_parallel` compiles a kernel twice -- threaded and serial -- and picks by its
first argument: serial below PARALLEL_MIN_ELEMENTS elements, and for a 2-D first argument of a
single row (the kernels' prange runs over the rows of their first argument: one row is one
task). A kernel that splits its work otherwise calls `.parallel` itself. Both are cached on
disk; the serial one under its own name, so the two never share a cache entry.

Numba's disk cache keys a kernel on its own source file only: after editing a helper that is
inlined into kernels of other files (`_keys.key_of`, `isotonic._cpu.*_row`), delete the
`__pycache__/*.nbi|*.nbc` files of the package (a fresh install never has stale entries).
"""

from __future__ import annotations

import functools
import types

import numba

# Below this many elements in the first argument, one thread is faster than waking the pool.
PARALLEL_MIN_ELEMENTS = 1 << 15


def row_parallel(fn):
    parallel = numba.njit(parallel=True, cache=True, nogil=True)(fn)
    serial_fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                   fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    serial = numba.njit(cache=True, nogil=True)(serial_fn)

    @functools.wraps(fn)
    def call(*args):
        first = args[0]
        if first.size >= PARALLEL_MIN_ELEMENTS and not (first.ndim == 2 and first.shape[0] == 1):
            return parallel(*args)
        return serial(*args)

    call.parallel = parallel
    call.serial = serial
    return call
