"""Linear maps with a custom transpose: how every op's tangent map keeps its fast kernels.

Each op's derivative is a map linear in the tangent once the forward's residuals are fixed
(the int32 permutation and block ids, plus for KL the input and the output): a gather, a
block mean, a block-softmax-weighted sum (DESIGN.md section 3). `apply_linear(op, residuals,
linear)` binds that map as one JAX primitive whose
- transpose is the map `op.transposed()` (so reverse mode runs the op's fused VJP kernel, one
  callback, as fast as a `custom_vjp`), and transposing twice gives `op` back;
- JVP is the map itself on the tangents of the linear inputs (it is linear), plus, for maps
  that depend differentiably on a float residual (`op.reference` given: a pure-JAX version of
  the same map), the derivative of that reference in the residuals: second order;
- batching rule moves every batch dim to the front (broadcasting unbatched operands): every
  map works on (..., n) rows with any leading dims, in one call for the whole batch;
- lowering is the map's own function (`op.apply`), traced with the callback route (mode, GPU
  backend, emulated device) that was current when the map was bound.

Only `jax.extend.core.Primitive` and the `jax.interpreters` rule tables are used (JAX's own
`linear_call` has no batching rule).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from ._call import current_route, routed
from ._sharding import as_varying, varying_axes

__all__ = ["LinearOp", "apply_linear", "integer_tangent"]


@dataclasses.dataclass(frozen=True)
class LinearOp:
    """A map `apply(*residuals, *linear) -> tuple` linear in `linear`, with its transpose
    `transpose(*residuals, *cotangents) -> tuple` (one cotangent per output, one result per
    linear input). `reference` / `transpose_reference`: pure-JAX versions of the two, needed
    only when the map depends differentiably on a float residual (None: it does not: the
    residuals' tangents are ignored, e.g. int32 permutations, or x used only to find
    non-finite rows). All four must be hashable, stable objects (module-level functions or
    cached factories): they are primitive parameters."""
    name: str
    apply: Callable
    transpose: Callable
    reference: Optional[Callable] = None
    transpose_reference: Optional[Callable] = None

    def transposed(self) -> "LinearOp":
        return LinearOp(f"{self.name}_T", self.transpose, self.apply, self.transpose_reference,
                        self.reference)


def integer_tangent(a):
    """The (zero, float0) tangent of an integer output `a` of a custom JVP rule, varying over
    the manual mesh axes `a` varies over (inside shard_map)."""
    zero = np.zeros(a.shape, dtype=jax.dtypes.float0)
    return as_varying((zero,), varying_axes(a))[0]


_linear_p = Primitive("sortgrad_linear")
_linear_p.multiple_results = True


def apply_linear(op: LinearOp, residuals, linear):
    """op.apply(*residuals, *linear) as a transposable, batchable, differentiable primitive."""
    residuals, linear = tuple(residuals), tuple(linear)
    return tuple(_linear_p.bind(*residuals, *linear, op=op, num_res=len(residuals),
                                route=current_route()))


def _run(fn, args, route):
    with routed(route):
        return tuple(fn(*args))


def _impl(*args, op, num_res, route):
    return _run(op.apply, args, route)


def _abstract_eval(*avals, op, num_res, route):
    # The map traced on the full avals: shardings and, inside shard_map, the manual axes the
    # results vary over (check_vma) are what the map's own JAX ops give.
    return list(jax.make_jaxpr(lambda *a: _run(op.apply, a, route))(*avals).out_avals)


def _lowering(ctx, *args, op, num_res, route):
    return mlir.lower_fun(lambda *a: _run(op.apply, a, route), multiple_results=True)(ctx, *args)


def _is_zero(t) -> bool:
    return type(t) is ad.Zero


def _jvp(primals, tangents, *, op, num_res, route):
    outs = _linear_p.bind(*primals, op=op, num_res=num_res, route=route)
    res, lin = primals[:num_res], primals[num_res:]
    res_t, lin_t = tangents[:num_res], tangents[num_res:]
    out_t = None
    if not all(_is_zero(t) for t in lin_t):
        lin_t = [ad.instantiate_zeros(t) for t in lin_t]
        out_t = list(_linear_p.bind(*res, *lin_t, op=op, num_res=num_res, route=route))
    if op.reference is not None and not all(_is_zero(t) for t in res_t):
        res_t = [integer_tangent(r) if not _differentiable(r)
                 else ad.instantiate_zeros(t) for r, t in zip(res, res_t)]

        def in_residuals(*r):
            with routed(route):
                return tuple(op.reference(*r, *lin))
        _, extra = jax.jvp(in_residuals, tuple(res), tuple(res_t))
        out_t = list(extra) if out_t is None else [a + b for a, b in zip(out_t, extra)]
    if out_t is None:
        return outs, [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in outs]
    return outs, out_t


def _differentiable(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _transpose(cts, *args, op, num_res, route):
    res, lin = args[:num_res], args[num_res:]
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError(f"{op.name}: residuals are not linear inputs")
    cts = [ad.instantiate_zeros(ct) if _is_zero(ct) else ct for ct in cts]
    outs = _linear_p.bind(*res, *cts, op=op.transposed(), num_res=num_res, route=route)
    return [None] * num_res + list(outs)


def _batch(args, dims, *, op, num_res, route):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [jnp.moveaxis(a, d, 0) if d is not None
             else jnp.broadcast_to(a, (size,) + a.shape) for a, d in zip(args, dims)]
    outs = _linear_p.bind(*moved, op=op, num_res=num_res, route=route)
    return outs, [0] * len(outs)


_linear_p.def_impl(_impl)
_linear_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_linear_p, _lowering)
ad.primitive_jvps[_linear_p] = _jvp
ad.primitive_transposes[_linear_p] = _transpose
batching.primitive_batchers[_linear_p] = _batch
