"""Which host callbacks a program lowered for the CPU holds (the callback mode is read at trace
time; the GPU branch of the binding is not lowered for the CPU)."""

from __future__ import annotations

import re

import jax

# the custom-call target of each callback mode on XLA:CPU
CPU_CALLBACK_TARGETS = {"buffer": "xla_buffer_python_cpu_callback",
                        "pure": "xla_ffi_python_cpu_callback"}


def callback_targets(f, *args) -> set:
    """The custom-call targets of `jax.jit(f)` lowered for the CPU on `args`."""
    return set(re.findall(r"custom_call @(\w+)", jax.jit(f).lower(*args).as_text()))
