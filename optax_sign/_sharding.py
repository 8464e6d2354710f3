"""Meshes, partition specs and worker-stacked trees for the sharded entry points.

Shared by :mod:`optax_sign._worker_grad` and :mod:`optax_sign._data_parallel`:
finding the mesh of a call, reading a leaf's ``PartitionSpec``, finding
leaves sharded over the worker axis (FSDP), and the leading worker axis
convention (``x[None]`` inside a ``shard_map`` body, ``P(axis)`` outside).
"""

from typing import Any, Hashable, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def check_axis_name(axis_name: Any) -> None:
  if isinstance(axis_name, (tuple, list)) or axis_name is None:
    raise ValueError(f"axis_name must name one mesh axis; got {axis_name!r}")


def named_sharding(leaf: Any) -> Any:
  """The ``NamedSharding`` of a concrete array or a tracer, else ``None``."""
  sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    sharding = jax.typeof(leaf).sharding
  return sharding if isinstance(sharding, NamedSharding) else None


def find_mesh(mesh: Any, trees: Sequence[Any], axis_name: Hashable) -> Any:
  """``mesh``, else the context mesh, else the mesh of the first sharded leaf.

  Raises:
    ValueError: if no mesh is found or it has no axis ``axis_name``.
  """
  if mesh is None:  # the context's concrete mesh (eager), else its abstract
    try:
      mesh = jax.sharding.get_mesh()
    except ValueError:  # inside jit only the abstract mesh is known
      mesh = None
    if mesh is None or mesh.empty:
      mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    for leaf in jax.tree.leaves(trees):
      sharding = named_sharding(leaf)
      if sharding is not None and not sharding.mesh.empty:
        mesh = sharding.mesh
        break
  if mesh is None or mesh.empty:
    raise ValueError(
        "no mesh found for the worker axis: pass mesh=, call inside "
        "`with jax.set_mesh(mesh):`, or pass arrays placed with a "
        "NamedSharding")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh "
                     f"(axes {mesh.axis_names})")
  return mesh


def spec_of(leaf: Any) -> tuple:
  """The ``PartitionSpec`` entries of ``leaf``, padded with ``None`` to its
  rank (all ``None`` when unknown, as under Auto axes inside ``jit``)."""
  sharding = named_sharding(leaf)
  entries = tuple(sharding.spec) if sharding is not None else ()
  return entries + (None,) * (jax.numpy.ndim(leaf) - len(entries))


def _uses(entry: Any, axis_name: Hashable) -> bool:
  return entry == axis_name or (isinstance(entry, tuple) and axis_name in entry)


def worker_sharded(tree: Any, axis_name: Hashable, what: str) -> Any:
  """Per leaf of ``tree``, whether its leading dimension is sharded over the
  worker axis (FSDP / ZeRO over that axis); ``False`` for leaves the workers
  hold whole.

  Raises:
    ValueError: if the worker axis shards another dimension of a leaf, or
      the leading dimension of a leaf on a mesh where that axis is not
      Explicit (inside ``jit`` its layout would be unknown).
  """
  def sharded(path, leaf):
    spec = spec_of(leaf)
    where = [d for d, e in enumerate(spec) if _uses(e, axis_name)]
    name = f"{what} {jax.tree_util.keystr(path)}"
    if not where:
      return False
    if where != [0] or spec[0] != axis_name:
      raise ValueError(
          f"{name} is sharded over the worker axis {axis_name!r} in "
          f"dimension(s) {where} of spec {P(*spec)}: FSDP over the worker "
          "axis shards the leading dimension only, by that axis alone. Shard "
          "the other dimensions over other mesh axes (for example 'model').")
    mesh = named_sharding(leaf).mesh
    if dict(zip(mesh.axis_names, mesh.axis_types))[axis_name] != (
        jax.sharding.AxisType.Explicit):
      raise ValueError(
          f"{name} is sharded over the worker axis {axis_name!r}, which is "
          "not Explicit: FSDP over the worker axis needs an Explicit axis "
          "(jax.make_mesh's default), or shard the leaf over another axis.")
    return True

  return jax.tree_util.tree_map_with_path(sharded, tree)


def split_specs(flags: Any, axis_name: Hashable) -> Any:
  """``P(axis_name)`` where a flag is set (split over the workers), else
  ``P()``: ``shard_map`` specs from a tree of booleans."""
  return jax.tree.map(lambda f: P(axis_name) if f else P(), flags)


def without_axis(spec: tuple, axis_name: Hashable) -> tuple:
  """``spec`` with the worker axis dropped (a gathered FSDP leaf)."""
  return tuple(None if e == axis_name else e for e in spec)


def on_context_mesh(x: jax.Array) -> jax.Array:
  """``x`` replicated on the mesh set by ``jax.set_mesh`` (as is without one).

  State made from a value built outside the mesh (a PRNG key created at
  import) then has the type that ``update`` gives it under the mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  placed = isinstance(getattr(x, "sharding", None), NamedSharding)
  if mesh.empty or placed or isinstance(x, jax.core.Tracer):
    return x
  return jax.sharding.reshard(x, P())


def with_auto(mesh: Any, axes: tuple) -> Any:
  """``mesh`` with ``axes`` turned Auto (a concrete or an abstract mesh)."""
  if not axes:
    return mesh
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return mesh.update_axis_types({a: jax.sharding.AxisType.Auto
                                   for a in axes})
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=tuple(
      jax.sharding.AxisType.Auto if a in axes else t
      for a, t in zip(mesh.axis_names, mesh.axis_types)))


def _free_axes(axis_type: Any) -> tuple:
  """Axes of the context mesh of ``axis_type`` that are not manual here."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
               if t == axis_type and a not in mesh.manual_axes)


def free_explicit_axes() -> tuple:
  """Explicit axes of the context mesh that are not manual here."""
  return _free_axes(jax.sharding.AxisType.Explicit)


def unknown_layout_axes() -> tuple:
  """Auto axes of size > 1 of the context mesh that are not manual here:
  inside ``jit`` a leaf's layout over them is the compiler's choice."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(a for a in _free_axes(jax.sharding.AxisType.Auto)
               if mesh.shape[a] > 1)


def on_local_shards(fn: Any, leaves: Sequence[Any], shared: Any) -> list:
  """``fn(leaves, shared)`` on the local shards of ``leaves``.

  Inside a region manual over the workers' axis only, the other Explicit
  axes (``"model"``) are partitioned by the compiler: flattening a leaf
  sharded over them would reshard it. Here ``fn`` runs in a nested
  ``shard_map`` manual over those axes too, with each leaf's own spec, so it
  sees plain local blocks (a sharded leaf varies over ``"model"``, a
  replicated one does not) and its outputs keep the leaves' layouts.
  ``shared`` (scalars, flags) reaches every shard whole. Without such axes
  ``fn`` runs as it is.
  """
  axes = free_explicit_axes()
  if not axes or not leaves:
    return fn(leaves, shared)
  specs = [P(*spec_of(x)) for x in leaves]
  return jax.shard_map(
      fn, in_specs=(specs, jax.tree.map(lambda _: P(), shared)),
      out_specs=specs, axis_names=set(axes))(list(leaves), shared)


def stack(tree: Any) -> Any:
  """A leading worker axis of size 1 on this worker's block."""
  return jax.tree.map(lambda x: x[None], tree)
