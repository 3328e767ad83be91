"""The `route` fixture (used by tests/bindings): one binding test body on every way a JAX op
reaches its kernels.

Params (test ids):
  "default"          what JAX's default backend lowers: the CPU branch here (NumPy views of
                     XLA's buffers); on a GPU machine the real GPU branch (CuPy kernels on
                     XLA's stream).
  "cupy-emulated"    the GPU branch of the binding (`_call._device_call`: wrapped buffers,
                     stream, measured scratch output carved by the workspace, vmap batching)
                     with the CuPy kernels on the CUDA host emulator (tests/_emulation).
  "gpu"              (marker gpu) the same as "default" where JAX has a GPU (the real GPU
                     branch, selected by `pytest -m gpu`); skipped elsewhere.
  "numba-simulator"  the same branch with the Numba kernels on Numba's CUDA simulator
                     (marker cudasim), with the lowered launch constants of tests/_backends.py
                     for every op (small rows already take the multi-pass paths; fast).
The fixture yields the route name. The simulator runs each CUDA thread as a Python thread:
only tests marked `simulator_route` take that route, and `simulator_case(route, condition)`
skips a case there unless `condition` holds (a few small cases).
"""

from __future__ import annotations

import importlib

import pytest
from _backends import LOWERED, SPECS, _unavailable

from sortgrad.bindings.jax import _call, _device

ROUTES = ("default", "gpu", "cupy-emulated", "numba-simulator")
_MARKS = {"gpu": (pytest.mark.gpu,), "numba-simulator": (pytest.mark.cudasim,)}


def _lower_every_op(monkeypatch) -> None:
    for entries in LOWERED.values():
        for module_name, name, value, raising in entries:
            target = importlib.import_module(module_name)
            if raising or hasattr(target, name):
                monkeypatch.setattr(target, name, value)


@pytest.fixture(params=[pytest.param(r, marks=_MARKS.get(r, ()), id=r) for r in ROUTES])
def route(request, monkeypatch):
    name = request.param
    if name != "default" and "mode" in request.fixturenames and \
            request.getfixturevalue("mode") == "pure":
        pytest.skip("the pure callback mode does not take the GPU branch")
    if name == "gpu" and not _device._jax_has_gpu():
        pytest.skip("JAX has no GPU here")
    if name in ("default", "gpu"):
        yield name
        return
    if name == "numba-simulator" and request.node.get_closest_marker("simulator_route") is None:
        pytest.skip("not a simulator_route test (the simulator is slow)")
    reason = _unavailable(SPECS[name])
    if reason:
        pytest.skip(reason)
    from _emulation import jax_device
    # every pass's scratch must fit the measured XLA output (no memory from a pool)
    monkeypatch.setattr(_device, "warn_once", _fail_on_warning)
    if name == "cupy-emulated":
        platform = jax_device.EmulatedCupy(request.getfixturevalue("cuda_emulator"))
    else:
        _lower_every_op(monkeypatch)
        platform = jax_device.SimulatedNumba()
    with _call.emulate_device(platform):
        yield name


def _fail_on_warning(key, message):
    raise AssertionError(f"the GPU branch warned: {message}")


def simulator_case(route: str, condition: bool) -> None:
    """On the simulator route, skips the case unless `condition` (keep a few small cases)."""
    if route == "numba-simulator" and not condition:
        pytest.skip("a case the simulator route leaves to the other routes")
