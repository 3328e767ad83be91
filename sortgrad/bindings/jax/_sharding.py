"""sortgrad ops in sharded JAX programs.

Inside `jax.shard_map` (check_vma=True): a host or device callback returns values JAX types
as the same on every device of the manual mesh axes (its outputs carry no varying axes), while
the rows it computed are each device's own. `as_varying` marks the results varying over the
manual axes their arguments vary over (`jax.lax.pcast(..., to="varying")`, no data moves), so
every op, its tangent maps and their transposes type-check per shard.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ._device import warn_once


def varying_axes(*arrays) -> tuple:
    """The manual mesh axes (inside shard_map) any of `arrays` varies over, sorted."""
    axes = set()
    for a in arrays:
        aval = jax.typeof(a)
        mat = getattr(aval, "manual_axis_type", None)
        axes.update(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())
    return tuple(sorted(axes, key=str))


def as_varying(arrays, axes: tuple) -> tuple:
    """Each of `arrays` typed as varying over `axes` (those it does not vary over already)."""
    if not axes:
        return tuple(arrays)
    out = []
    for a in arrays:
        missing = tuple(ax for ax in axes if ax not in varying_axes(a))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return tuple(out)


# --- batch-sharded operands: each device runs the op on its own rows ---------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """How an op's operands and results line up with the dims of its first operand x.

    `axis`: the dim of x the op works along (never split across devices). `operands`: for each
    operand, which dim of x each of its dims is (None: a dim of its own, never split).
    `results`: the same for the results (every result of an op shares one layout)."""
    axis: int
    operands: tuple
    results: tuple


def rowwise(ndim: int, axis: int, results: tuple | None = None) -> Layout:
    """The layout of an op on one operand x of `ndim` dims whose results keep x's dims in
    order (sort, top_k, soft ops), or have the dims `results` (indices into x's dims)."""
    dims = tuple(range(ndim))
    return Layout(axis, (dims,), dims if results is None else tuple(results))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Run the op inside `jax.shard_map` over the mesh axes `axes` of `mesh`: x's dims split
    as `entries` (one PartitionSpec entry per dim; the op's axis None)."""
    mesh: object
    axes: frozenset
    entries: tuple
    layout: Layout

    def spec(self, dims) -> P:
        return P(*(None if d is None else self.entries[d] for d in dims))

    def create(self, make, dims, *args):
        """make(*args), an array with dims `dims` (see Layout), created split as this plan
        splits those dims: each device computes only its own part when `make` is
        partitionable (jax.random's samplers are). `make` takes `out_sharding=` (as they do)
        for explicit axes; auto axes are set by a jit's out_shardings."""
        sharding = NamedSharding(self.mesh, self.spec(dims))
        if all(t == AxisType.Explicit for n, t in zip(self.mesh.axis_names,
                                                     self.mesh.axis_types) if n in self.axes):
            return make(*args, out_sharding=sharding)
        return jax.jit(make, out_shardings=sharding)(*args)

    def in_specs(self) -> tuple:
        return tuple(self.spec(dims) for dims in self.layout.operands)

    def out_specs(self) -> P:
        return self.spec(self.layout.results)


def plan(operands: tuple, layout: Layout) -> Plan | None:
    """How to run an op on `operands` so that nothing is gathered: a Plan when x's batch dims
    are split over mesh axes sortgrad can see (explicit axes, under jit or eagerly, or any
    NamedSharding of a concrete array), else None (the op runs as one call). A split of the op's
    own axis is dropped: that axis is gathered (`run_sharded`)."""
    x = operands[0]
    found = _mesh_and_entries(x)
    if found is None:
        return None
    mesh, entries = found
    sizes = dict(mesh.shape)
    entries = [_keep(e, sizes) for e in entries]
    entries[layout.axis] = None
    axes = frozenset(a for e in entries if e is not None for a in _names(e))
    if not axes:
        return None
    return Plan(mesh, axes, tuple(entries), layout)


def _mesh_and_entries(x):
    """(mesh, one spec entry per dim of x) of the mesh axes x is split over, or None.
    A concrete array: its NamedSharding (auto or explicit axes). A tracer: its type, which
    carries explicit axes only (auto axes are invisible at trace time; manual axes, inside a
    shard_map, are already per device)."""
    if not isinstance(x, jax.core.Tracer):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh, _padded(sharding.spec, x.ndim)
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return None
    mesh = sharding.mesh
    explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
    entries = []
    for e in _padded(sharding.spec, x.ndim):
        names = tuple(a for a in _names(e) if a in explicit)
        entries.append(names or None)
    return mesh, entries


def _padded(spec, ndim: int) -> list:
    entries = list(spec) + [None] * (ndim - len(spec))
    return [None if e is P.UNCONSTRAINED else e for e in entries[:ndim]]


def _names(entry) -> tuple:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _keep(entry, sizes: dict):
    """A spec entry without its mesh axes of size 1 (they split nothing)."""
    names = tuple(a for a in _names(entry) if sizes.get(a, 1) > 1)
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def run_sharded(body, operands: tuple, p: Plan):
    """body(*operands) inside `jax.shard_map` over `p.axes`: each device runs it on its own
    rows (callbacks per shard, never a gather of the batch). Operands whose split differs
    from the plan (the op's own axis split, explicit axes) are resharded to it first."""
    in_specs = p.in_specs()
    operands = tuple(_resharded(o, s, p.mesh) for o, s in zip(operands, in_specs))
    mapped = jax.shard_map(body, mesh=p.mesh, in_specs=in_specs, out_specs=p.out_specs(),
                           axis_names=set(p.axes), check_vma=True)
    return mapped(*operands)


def _resharded(x, spec: P, mesh):
    """x with explicit-axis split `spec` where its type carries another one (a type without
    explicit axes is left to the shard_map's own input resharding)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return x
    explicit = [n for n, t in zip(sharding.mesh.axis_names, sharding.mesh.axis_types)
                if t == AxisType.Explicit]
    if not explicit:
        return x
    current = _padded(sharding.spec, x.ndim)
    wanted = _padded(spec, x.ndim)
    if [_names(e) for e in current] == [_names(e) for e in wanted]:
        return x
    return jax.sharding.reshard(x, spec)


def warn_if_unseen() -> None:
    """Warns once when an op is traced under a mesh context whose auto axes may split its
    input: sortgrad cannot see that split at trace time, so the op would run as one call on
    the whole (gathered) array."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return
    auto = tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types)
                 if t == AxisType.Auto and dict(mesh.shape)[n] > 1)
    if auto:
        warn_once(("auto-axes", auto),
                  f"sortgrad: an op traced under a mesh with auto axes {auto} cannot see how "
                  f"its input is split; it runs as one call on the gathered array. Make the "
                  f"axes explicit (jax.make_mesh(..., axis_types=(AxisType.Explicit, ...)) "
                  f"with jax.set_mesh) or call the op inside jax.shard_map: then each device "
                  f"runs it on its own rows.")
