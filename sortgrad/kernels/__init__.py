"""sortgrad.kernels: array in, array out; no autodiff and no JAX.

Every kernel takes NumPy arrays (CPU backend) -- or, where a GPU backend is installed, CuPy or
Numba device arrays -- and returns arrays of the same kind; `out=` writes into given arrays and
`stream=` picks the launch stream on device backends. Rows are the last axis; leading dims are
batch. The backend follows the arrays unless `backend=` names one (`_backends.py`).

The API is the `__all__` of every op package in the registry (`_backends.REGISTRY`):
segmented_sort, segmented_argsort, top_k, inverse_permutation, permutation_scatter,
isotonic_regression(_vjp), soft_rank(_vjp), soft_sort(_vjp), soft_top_k_mask(_vjp); plus the
device scratch policy of the calling thread (`_cuda/workspace.py`): `use_scratch(buffer)` (the
device backends carve their outputs and scratch from a given 1-D uint8 device buffer) and
`measure_scratch()` (count what they allocate), `device_unavailable(backend)` (why a device
backend cannot run here, or None), `GPU_EXTRA` (the pip extras to name), and
`record_call(fn, arrays, out)` -> (result, `CallPlan` or None): a CPU call recorded once per
array signature and replayed without its Python-level checks (`_plans.py`).

NaNs in the hard ops, as JAX on XLA:CPU: segmented_sort / segmented_argsort tie every NaN (any
sign, any payload) above +inf; top_k orders floats by IEEE totalOrder (-NaN lowest, +NaN
highest, the NaNs of one sign by payload), except bfloat16, whose NaNs of one sign tie. Values
keep their input bits, except bfloat16 NaNs, which come back as the quiet NaN of their sign
(0x7FC0 | sign) from rows (segments) of more than one element. The same on every backend.
"""

import importlib as _importlib

from ._backends import GPU_EXTRA, device_unavailable
from ._backends import OPS as _OPS
from ._cuda.workspace import measuring as measure_scratch
from ._cuda.workspace import use as use_scratch
from ._jit_cache import ensure_fresh as _ensure_fresh
from ._plans import CallPlan, record_call

__all__ = ["use_scratch", "measure_scratch", "GPU_EXTRA", "device_unavailable", "record_call",
           "CallPlan"]
for _op in _OPS:
    _package = _importlib.import_module(f".{_op}", __name__)
    for _name in _package.__all__:
        globals()[_name] = getattr(_package, _name)
        __all__.append(_name)

# Before any kernel runs (Numba reads its disk cache at a kernel's first call): a cached
# kernel is never older than the sources.
_ensure_fresh()
