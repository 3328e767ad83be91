# Before anything imports Numba: without a CUDA GPU, run Numba's CUDA kernels on its simulator
# (NUMBA_ENABLE_CUDASIM=1 only changes the cuda target; the CPU njit kernels are untouched).
# SORTGRAD_TEST_CUDASIM=0 turns this off; an explicit NUMBA_ENABLE_CUDASIM is respected.
import os
import sys


def _cuda_gpu_visible() -> bool:
    """A CUDA driver that initialises and sees a device, checked with ctypes (importing
    numba.cuda here would fix its target before the environment is set)."""
    import ctypes
    try:
        driver = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    try:
        if driver.cuInit(0) != 0:
            return False
        count = ctypes.c_int(0)
        return driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except AttributeError:
        return False


if (os.environ.get("SORTGRAD_TEST_CUDASIM", "1") != "0"
        and "NUMBA_ENABLE_CUDASIM" not in os.environ and not _cuda_gpu_visible()):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules and "numba.cuda" not in sys.modules:  # imported by a plugin
        from numba.core import config as _numba_config
        _numba_config.reload_config()

import pytest

# tests/multidevice needs eight host devices, fixed when JAX starts: it runs in a process of
# its own (tests/bindings/test_sharding.py sets SORTGRAD_MULTIDEVICE=1 there).
collect_ignore = [] if os.environ.get("SORTGRAD_MULTIDEVICE") == "1" else ["multidevice"]

try:
    import jax
    import numba  # noqa: F401
    from hypothesis import settings
except ImportError as error:  # a Python without the project's test dependencies
    _MISSING = error
else:
    _MISSING = None


def pytest_configure(config):
    if _MISSING is not None:
        raise pytest.UsageError(
            f"the tests need sortgrad's test dependencies ({_MISSING}); install them with the "
            'README\'s test command: python -m pip install -e ".[test]" && python -m pytest -q')


if _MISSING is None:
    # float64 references and gradients need x64; the library itself works in either mode.
    jax.config.update("jax_enable_x64", True)

    # CI runs the same property examples every time (a red run is reproducible); explore with
    # `pytest --hypothesis-profile=explore`.
    settings.register_profile("sortgrad", derandomize=True, database=None)
    settings.register_profile("explore", max_examples=500)
    settings.load_profile("sortgrad")

    # Test machinery outside the package (tests/_emulation): make the static shared arrays of
    # Numba's CUDA simulator thread-safe (NUMBA_ENABLE_CUDASIM is settled above; no kernel has
    # run yet). The package itself patches nothing.
    from _emulation import numba_simulator
    numba_simulator.install()

    from _backends import backend, cuda_emulator  # noqa: F401  (the backend fixture)
