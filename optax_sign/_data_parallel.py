r"""An optimizer that aggregates across workers inside a plain jitted step.

:func:`data_parallel` wraps any transformation of this library that
communicates over a mesh axis (a chain with :func:`~optax_sign.majority_vote`,
:func:`~optax_sign.mean_of_signs`, multi-worker ALIAS, error feedback) so that
its ``update`` takes the stacked per-worker gradients of
:func:`~optax_sign.worker_value_and_grad`, runs once per worker inside a
``jax.shard_map`` and returns the one update all workers agreed on, shaped and
sharded like the parameters.

**Per-worker state.** A state leaf that differs between workers (an error
feedback residual, a momentum of local gradients, ALIAS's gradient snapshot)
is stored with a leading worker axis of size :math:`N` sharded over the worker
axis, so each device keeps its own worker's copy; shared leaves (counters,
stepsizes, voted bits) are stored once. Which leaves are per worker is found
at trace time, before any step, by tracing one update from a shared state
(JAX's varying-axes types mark what depends on a worker's own gradient), to a
fixed point; so the state's structure depends only on the parameters' shapes.

**Layouts.** When every other mesh axis is ``Explicit`` (the default of
``jax.make_mesh``), the ``shard_map`` is manual over all axes with the specs
read from the arrays: each worker exchanges only its local shard, leaves
sharded over ``"model"`` and replicated leaves go in separate collectives,
and whole-model statistics sum over the shards. Otherwise (``Auto`` axes,
whose layout is unknown inside ``jit``) it is manual over the worker axis
only and the compiler partitions the rest (correct, but flattening leaves
may cost traffic over those axes).
"""

from typing import Any, Callable, Dict, Hashable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from optax_sign import _communication
from optax_sign import _sharding

_EXPLICIT = jax.sharding.AxisType.Explicit


def _fully_manual(mesh: Any, axis_name: Hashable, state: Any,
                  params: Any) -> bool:
  """Whether the update can run on local shards: every other mesh axis is
  Explicit (so the leaves' specs are known) and every state leaf is a scalar
  or shaped like a parameter (so it is sharded like one; packed bit planes
  are not, and take the partly manual layout)."""
  shapes = {tuple(jnp.shape(p)) for p in jax.tree.leaves(params)}
  return (all(t == _EXPLICIT for a, t in zip(mesh.axis_names, mesh.axis_types)
              if a != axis_name) and
          all(x.ndim == 0 or tuple(x.shape) in shapes
              for x in jax.tree.leaves(state)))


def _drop_first(tree: Any) -> Any:
  return jax.tree.map(lambda x: x[0], tree)


def _drop_first_where(tree: Any, mask: Any) -> Any:
  """Shapes of ``tree`` without the leading worker axis where ``mask``."""
  return jax.tree.map(
      lambda x, m: jax.ShapeDtypeStruct(x.shape[1:] if m else x.shape,
                                        x.dtype), tree,
      jax.tree.map(lambda _: mask, tree) if isinstance(mask, bool) else mask)


def _abstract(shapes: Any, mask: Any, num_workers: int) -> Any:
  """Shape-dtype structs, with a leading worker axis where ``mask``."""
  return jax.tree.map(
      lambda x, m: jax.ShapeDtypeStruct(
          ((num_workers,) if m else ()) + tuple(x.shape), x.dtype),
      shapes, mask)


def _varies(tree: Any, axis_name: Hashable) -> Any:
  return jax.tree.map(
      lambda x: axis_name in _communication.varying_axes(x), tree)


def _first_changed_path(tree: Any) -> Optional[str]:
  for path, flag in jax.tree_util.tree_leaves_with_path(tree):
    if flag:
      return jax.tree_util.keystr(path)
  return None


def _trace_step(inner, mesh, axis_name, params, state, mask, value):
  """Traces one update (no run) with ``mask``-ed state leaves per worker.

  Returns:
    ``(updates_vary, state_vary)``: trees of booleans, whether each output
    leaf varies over ``axis_name``.
  """
  num_workers = mesh.shape[axis_name]
  found = {}
  state_specs = jax.tree.map(lambda m: P(axis_name) if m else P(), mask)

  def body(grads, state, params, value):
    state = jax.tree.map(lambda x, m: x[0] if m else x, state, mask)
    updates, new_state = inner.update(_drop_first(grads), state, params,
                                      value=value[0])
    found["updates"] = _varies(updates, axis_name)
    found["state"] = _varies(new_state, axis_name)
    return _sharding.stack((updates, new_state))

  grads = _abstract(params, jax.tree.map(lambda _: True, params), num_workers)
  jax.eval_shape(jax.shard_map(
      body, mesh=mesh, axis_names={axis_name},
      in_specs=(P(axis_name), state_specs, P(), P(axis_name)),
      out_specs=P(axis_name)), grads, _abstract(state, mask, num_workers),
      params, value)
  return found["updates"], found["state"]


def worker_state_mask(inner: optax.GradientTransformationExtraArgs,
                      params: Any, mesh: Any, axis_name: Hashable) -> Any:
  """Which leaves of ``inner.init(params)`` differ between workers.

  The fixed point of tracing one update (with a per-worker ``value=``) from a
  state whose per-worker leaves are those found so far.

  Raises:
    ValueError: if the updates still differ between workers.
  """
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x),
                                                        x.dtype), params)
  state = jax.eval_shape(inner.init, params)
  value = jax.ShapeDtypeStruct((mesh.shape[axis_name],), jnp.float32)
  mask = jax.tree.map(lambda _: False, state)
  while True:
    updates_vary, state_vary = _trace_step(inner, mesh, axis_name, params,
                                           state, mask, value)
    _check_agreed(updates_vary, axis_name)
    new_mask = jax.tree.map(lambda a, b: a or b, mask, state_vary)
    if new_mask == mask:
      return mask
    mask = new_mask


def _check_agreed(updates_vary: Any, axis_name: Hashable) -> None:
  path = _first_changed_path(updates_vary)
  if path is not None:
    raise ValueError(
        f"the update {path} still differs between the workers of "
        f"{axis_name!r}: data_parallel needs a transformation that aggregates "
        "over that axis (majority_vote, mean_of_signs, "
        "scale_by_error_feedback_sign(axis_name=...), alias_sign_sgd("
        "axis_name=...)). Local steps keep per-worker parameters and do not "
        "fit here: run them under shard_map or vmap.")


def _place(state: Any, mask: Any, mesh: Any, axis_name: Hashable) -> Any:
  """Per-worker leaves repeated along a new leading axis sharded over the
  workers (other axes sharded as before); shared leaves as they are."""
  num_workers = mesh.shape[axis_name]

  def place(x, per_worker):
    if not per_worker:
      return x
    x = jnp.asarray(x)
    spec = P(axis_name, *_sharding.spec_of(x))
    stacked = jnp.broadcast_to(x[None], (num_workers,) + x.shape)
    if isinstance(mesh, jax.sharding.AbstractMesh):
      return jax.sharding.reshard(stacked, spec)
    return jax.device_put(stacked, NamedSharding(mesh, spec))

  return jax.tree.map(place, state, mask)


def _specs(tree: Any, stacked: Any, axis_name: Hashable, full: bool) -> Any:
  """In/out specs: the leaves' own (fully manual) or the worker axis only."""

  def spec(x, s):
    if not full:
      return P(axis_name) if s else P()
    entries = _sharding.spec_of(x)
    return P(axis_name, *entries[1:]) if s else P(*entries)

  return jax.tree.map(spec, tree, stacked)


def _split_extra(extra_args: Dict[str, Any], num_workers: int) -> Any:
  """Extra arguments with a leading axis of size N are split per worker."""
  return jax.tree.map(lambda x: bool(jnp.ndim(x)) and
                      jnp.shape(x)[0] == num_workers, extra_args)


def data_parallel(
    inner: optax.GradientTransformation, axis_name: Hashable, *,
    mesh: Optional[Any] = None) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` once per worker on stacked per-worker gradients.

  ``update(grads, state, params)`` takes the output of
  :func:`~optax_sign.worker_value_and_grad` (leaves ``[N, *p.shape]``),
  gives worker :math:`i` its own :math:`g_i`, state and extra arguments, runs
  ``inner.update`` and returns the update, which must be the same on every
  worker (``inner`` aggregates over ``axis_name``), shaped like the
  parameters:

  .. math::
    u = \mathrm{inner}(g_1, \ldots, g_N), \qquad
    s_i \leftarrow \mathrm{inner.state}(g_i, s_i).

  Per-worker state leaves carry a leading worker axis (see the module
  notes); checkpoint the whole state so they resume exactly. Extra arguments
  with a leading axis of size :math:`N` (``value=`` from
  :func:`~optax_sign.worker_value_and_grad`, an ``alive=`` mask) are split
  over the workers; others reach every worker whole.

  Args:
    inner: a transformation that communicates over ``axis_name``.
    axis_name: the mesh axis of the workers (one name).
    mesh: the mesh; defaults to the one set by ``jax.set_mesh`` or the mesh
      of the first leaf placed with a ``NamedSharding``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` for ``nnx.Optimizer``,
    ``optax.apply_updates`` and ``optax`` wrappers.

  Raises:
    ValueError: at ``init`` or trace time, if ``inner``'s updates still differ
      between the workers (no aggregator over ``axis_name`` in it), if
      parameters are sharded over ``axis_name``, or if extra arguments make a
      shared state leaf per worker.

  Example:
    >>> tx = data_parallel(optax.chain(majority_vote("data"),
    ...                                optax.scale_by_learning_rate(1e-3)),
    ...                    "data")
  """
  _sharding.check_axis_name(axis_name)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    found = _sharding.find_mesh(mesh, params, axis_name)
    _sharding.check_replicated(params, axis_name, "parameter")
    mask = worker_state_mask(inner, params, found, axis_name)
    return _place(inner.init(params), mask, found, axis_name)

  def update_fn(updates, state, params=None, **extra_args):
    found = _sharding.find_mesh(mesh, (updates, params), axis_name)
    _sharding.check_replicated(params, axis_name, "parameter")
    like = (params if params is not None
            else _drop_first_where(updates, True))
    mask = worker_state_mask(inner, like, found, axis_name)
    return _run(inner, found, axis_name, mask, updates, state, params,
                extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _run(inner, mesh, axis_name, mask, updates, state, params, extra_args):
  """The ``shard_map`` of one update, with the layouts of the module notes."""
  full = _fully_manual(mesh, axis_name, _drop_first_where(state, mask),
                      _drop_first_where(updates, True))
  split = _split_extra(extra_args, mesh.shape[axis_name])
  every = lambda tree, flag: jax.tree.map(lambda _: flag, tree)
  grad_specs = _specs(updates, every(updates, True), axis_name, full)
  param_specs = _specs(params, every(params, False), axis_name, full)
  state_specs = _specs(state, mask, axis_name, full)
  extra_specs = _specs(extra_args, split, axis_name, full)
  out_specs = (jax.tree.map(lambda g: P(*_sharding.spec_of(g)[1:]), updates)
               if full else P())

  def body(updates, state, params, extra_args):
    state = jax.tree.map(lambda x, m: x[0] if m else x, state, mask)
    extra_args = jax.tree.map(lambda x, s: x[0] if s else x, extra_args, split)
    new_updates, new_state = _on_auto_axes(
        lambda u, s, p, e: inner.update(u, s, p, **e), _drop_first(updates),
        state)(_drop_first(updates), state, params, extra_args)
    _check_agreed(_varies(new_updates, axis_name), axis_name)
    _check_shared(jax.tree.map(lambda v, m: v and not m,
                               _varies(new_state, axis_name), mask), axis_name)
    return new_updates, jax.tree.map(lambda x, m: x[None] if m else x,
                                     new_state, mask)

  return jax.shard_map(
      body, mesh=mesh, axis_names=set(mesh.axis_names) if full else {axis_name},
      in_specs=(grad_specs, state_specs, param_specs, extra_specs),
      out_specs=(out_specs, state_specs))(updates, state, params, extra_args)


def _check_shared(changed: Any, axis_name: Hashable) -> None:
  path = _first_changed_path(changed)
  if path is not None:
    raise ValueError(
        f"the state leaf {path} is shared by the workers of {axis_name!r} "
        "after init but differs between them with these extra arguments: "
        "pass per-worker extra arguments only where the transformation "
        "averages them over the workers")


def _on_auto_axes(update: Callable[..., Any], updates: Any,
                  state: Any) -> Callable[..., Any]:
  """``update`` with the Explicit axes of a partly manual body made Auto.

  Only with a mesh that mixes Auto and Explicit axes: the library flattens
  and concatenates leaves, which Explicit axes allow only for some layouts.
  The outputs keep the inputs' shardings.
  """
  mesh = jax.sharding.get_abstract_mesh()
  explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
                   if t == _EXPLICIT and a not in mesh.manual_axes)
  if not explicit:
    return update
  spec = lambda x: jax.typeof(x).sharding.spec
  out = (jax.tree.map(spec, updates), jax.tree.map(spec, state))
  return jax.sharding.auto_axes(update, axes=explicit, out_sharding=out)
