"""Call plans: what a call of the kernel API handed its CPU backend, recorded once per array
signature and replayed without the Python-level checks (the fixed cost of tiny calls).

A public kernel validates its arguments (dtypes, shapes, `out`, options; microseconds of Python)
and then runs *steps*: data checks that must see every call's values (e.g. permutation entries
within [0, n): memory safety) and one backend row function. Everything it does to the arrays
goes through `step` (`_backends.call_rows` is one), so a call is fully described by its steps.

`record_call(fn, arrays, out)` runs `fn(*arrays, out=out)` (a public kernel, or a function
calling them) and records its steps; the `CallPlan` it returns repeats them for other arrays of
the same shapes and dtypes: each array argument of a step is a C-contiguous reshape of one of
the given arrays (the plan reshapes the new arrays the same way), every other argument is a
constant (read-only arrays sharing no memory with the call's arrays, e.g. key specs). A call
whose steps take anything else (a converted copy, a temporary, another view of the data), that
is handed the same buffer twice, or whose replay does not reproduce its results bit for bit
(checked once, on the recorded call's own arrays) gets no plan (None): call it the normal way. Only the CPU backend is planned, and
only calls of at most `MAX_ELEMENTS` elements in all (above, the checks cost nothing next to
the work, and the one-off check replay would cost a second run).

Contract of a plan: valid for arrays of exactly the recorded shapes and dtypes, C-contiguous,
the outputs writable and not overlapping the inputs (what XLA hands a host callback); the
dtype/shape checks are not repeated, the data checks are.
"""

from __future__ import annotations

import contextvars

import numpy as np

MAX_ELEMENTS = 1 << 16

_recording = contextvars.ContextVar("sortgrad_kernel_recording", default=None)


def step(fn, *args, **kwargs):
    """fn(*args, **kwargs): a data check or a backend row function of a public kernel. While
    a call is recorded (`record_call`), also a step of its plan."""
    recorder = _recording.get()
    if recorder is not None:
        recorder.add(fn, args, kwargs)
    return fn(*args, **kwargs)


class _Refused(Exception):
    """A step argument a plan cannot rebuild from the call's arrays."""


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class _Recorder:
    def __init__(self, arrays):
        self.arrays = arrays
        self.keys = [(_address(a), a.dtype, a.size) for a in arrays]
        self.steps = []
        self.refused = False

    def add(self, fn, args, kwargs):
        if self.refused:
            return
        try:
            self.steps.append((fn, self._template(args), self._template(kwargs)))
        except _Refused:
            self.refused = True

    def _template(self, value):
        """Leaves: ("array", index, shape) for a reshape of array `index`, ("const", value)."""
        if isinstance(value, tuple):
            return ("tuple", tuple(self._template(v) for v in value))
        if isinstance(value, list):
            return ("list", [self._template(v) for v in value])
        if isinstance(value, dict):
            return ("dict", {k: self._template(v) for k, v in value.items()})
        if isinstance(value, np.ndarray):
            if value.flags.c_contiguous and value.size:
                key = (_address(value), value.dtype, value.size)
                for index, known in enumerate(self.keys):
                    if known == key:
                        return ("array", index, value.shape)
            if value.flags.writeable or any(np.shares_memory(value, a) for a in self.arrays):
                raise _Refused  # a temporary, or another view of the call's data
            return ("const", value)  # e.g. a key spec: read-only, built from dtypes alone
        return ("const", value)


def _source(template, constants: list) -> str:
    """A Python expression building the value of `template` from `every` (the call's arrays);
    constants are appended to `constants` and read as c[i]."""
    kind = template[0]
    if kind == "const":
        constants.append(template[1])
        return f"c[{len(constants) - 1}]"
    if kind == "array":
        return f"every[{template[1]}].reshape({template[2]!r})"
    if kind == "tuple":
        return "(" + "".join(_source(t, constants) + ", " for t in template[1]) + ")"
    if kind == "list":
        return "[" + ", ".join(_source(t, constants) for t in template[1]) + "]"
    return "{" + ", ".join(f"{k!r}: {_source(t, constants)}" for k, t in template[1].items()) + "}"


class CallPlan:
    """The recorded steps of one call; `plan(arrays, out)` runs them on new arrays (same
    shapes and dtypes, see the module contract) and returns None (results are in `out`).

    The steps are compiled into one Python function (each step one call with its arguments
    written out: the reshapes and constants of the templates), so a replay costs little more
    than the row function's own call."""

    __slots__ = ("steps", "_run")

    def __init__(self, steps):
        self.steps = steps
        constants, lines = [], []
        for fn, args, kwargs in steps:
            constants.append(fn)
            call = f"c[{len(constants) - 1}](*{_source(args, constants)}"
            call += f", **{_source(kwargs, constants)})" if kwargs[1] else ")"
            lines.append("    " + call)
        namespace = {"c": constants}
        exec("def run(every):\n" + "\n".join(lines) + "\n", namespace)  # noqa: S102
        self._run = namespace["run"]

    def __call__(self, arrays, out) -> None:
        self._run((*arrays, *out))


def record_call(fn, arrays, out):
    """(fn(*arrays, out=out), plan or None): the call made, and its `CallPlan` (module doc).
    arrays, out: sequences of NumPy arrays."""
    arrays, out = tuple(arrays), tuple(out)
    every = (*arrays, *out)
    plannable = (all(isinstance(a, np.ndarray) and a.size for a in every)
                 and sum(a.size for a in every) <= MAX_ELEMENTS
                 and len({_address(a) for a in every}) == len(every))  # no buffer twice
    recorder = _Recorder(every) if plannable else None
    token = _recording.set(recorder)
    try:
        result = fn(*arrays, out=out)
    finally:
        _recording.reset(token)
    if recorder is None or recorder.refused or not recorder.steps:
        return result, None
    plan = CallPlan(tuple(recorder.steps))
    # The replay must reproduce the call: fresh outputs, the same inputs, the same bits.
    fresh = tuple(np.empty_like(o) for o in out)
    try:
        plan(arrays, fresh)
    except Exception:
        return result, None
    same = all(f.tobytes() == o.tobytes() for f, o in zip(fresh, out))
    return result, plan if same else None
