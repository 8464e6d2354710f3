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

**FSDP over the worker axis.** On an Explicit worker axis, parameters may be
sharded along their leading dimension over it (ZeRO / FSDP):
:func:`~optax_sign.worker_value_and_grad` gathers them and gives each worker
the full-size gradient, and ``inner`` (a chain with
:func:`~optax_sign.sharded_majority_vote`) returns each worker's update of
the shard it holds, so parameters, updates and the state leaves made from
them stay sharded; nothing else is gathered.

**Layout.** The ``shard_map`` is manual over the worker axis only, so the
other mesh axes stay with the compiler and any optax step in the chain
(``clip_by_global_norm``, schedules) sees whole leaves. The library's own
exchanges (the vote, mean of signs, error feedback) then work on local
shards by themselves on ``Explicit`` axes
(:func:`optax_sign._sharding.on_local_shards`): each worker sends only its
shard, leaves sharded over ``"model"`` and replicated leaves in separate
collectives. On ``Auto`` axes, whose layout is unknown inside ``jit``, the
vote and the mean of signs with ``transport="auto"`` take the elementwise
int8 all-reduce leaf by leaf, in each leaf's layout, and error feedback packs
each leaf's bits along its last axis; the vote's other transports work on
whole flattened leaves and the compiler reshards them (correct, but with
traffic over those axes). At the region's boundary the other Explicit
axes are made Auto and inside Explicit again (``jax.sharding.explicit_axes``
with the arrays' specs): JAX 0.10 lowers a partly manual region with its
other Explicit axes replicated, which would all-gather every sharded leaf.
"""

from typing import Any, Dict, Hashable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from optax_sign import _checks
from optax_sign import _communication
from optax_sign import _sharding

_EXPLICIT = jax.sharding.AxisType.Explicit


def _drop_first(tree: Any) -> Any:
  return jax.tree.map(lambda x: x[0], tree)


def _one_worker_shapes(tree: Any) -> Any:
  """Shape-dtype structs of a stacked tree without its leading worker axis."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                      tree)


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


class _Layout(NamedTuple):
  """How each leaf crosses the worker axis (trees of booleans)."""
  params: Any  # the parameter is sharded over the workers (FSDP)
  state: Any  # the state leaf is sharded like an FSDP parameter
  mask: Any  # the state leaf has one copy per worker (a leading axis)

  def state_specs(self, axis_name: Hashable) -> Any:
    """Per-worker copies and FSDP shards are split over the workers."""
    return _sharding.split_specs(
        jax.tree.map(lambda m, f: m or f, self.mask, self.state), axis_name)


def _varies_unless(tree: Any, axis_name: Hashable, *flags: Any) -> Any:
  """Whether each leaf varies over ``axis_name``, where no flag is set."""
  return jax.tree.map(lambda v, *f: v and not any(f),
                      _varies(tree, axis_name), *flags)


def _check_shapes(updates: Any, params: Any, fsdp: Any) -> None:
  """The updates are shaped like the parameters (the shards under FSDP)."""
  for (path, u), p, sharded in zip(
      jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params),
      jax.tree.leaves(fsdp)):
    if jnp.shape(u) != jnp.shape(p):
      hint = (" With parameters sharded over the worker axis, aggregate "
              "with sharded_majority_vote (each worker's update is its "
              "shard's)." if sharded else "")
      raise ValueError(
          f"the update {jax.tree_util.keystr(path)} has shape {jnp.shape(u)}"
          f" and its parameter {'shard ' if sharded else ''}"
          f"{jnp.shape(p)}.{hint}")


def _trace_step(inner, mesh, axis_name, params, state, layout, extra):
  """Traces one update (no run) with ``layout.mask``-ed state leaves per
  worker.

  Returns:
    ``(updates_vary, state_vary)``: trees of booleans, whether each output
    leaf varies over ``axis_name`` (always ``False`` for FSDP leaves, whose
    shards differ by construction).
  """
  num_workers = mesh.shape[axis_name]
  found = {}
  mask = layout.mask

  per_worker, shared = extra

  def body(grads, state, params, per_worker, shared):
    state = jax.tree.map(lambda x, m: x[0] if m else x, state, mask)
    updates, new_state = inner.update(_drop_first(grads), state, params,
                                      **_drop_first(per_worker), **shared)
    _check_shapes(updates, params, layout.params)
    found["updates"] = _varies_unless(updates, axis_name, layout.params)
    found["state"] = _varies_unless(new_state, axis_name, layout.state)
    return _sharding.stack((updates, new_state))

  grads = _abstract(params, jax.tree.map(lambda _: True, params), num_workers)
  state_specs = layout.state_specs(axis_name)
  specs = (P(axis_name), state_specs,
           _sharding.split_specs(layout.params, axis_name), P(axis_name), P())
  args = (grads, _abstract(state, mask, num_workers), params, per_worker,
          shared)
  region = jax.shard_map(body, mesh=mesh, axis_names={axis_name},
                         in_specs=specs, out_specs=P(axis_name))
  explicit = dict(zip(mesh.axis_names, mesh.axis_types))[axis_name] == _EXPLICIT

  def typed(*args):  # an Explicit worker axis checks the inputs' layout
    if explicit:
      args = jax.tree.map(
          lambda spec, tree: jax.tree.map(
              lambda x: jax.sharding.reshard(x, NamedSharding(mesh, spec)),
              tree),
          specs, args, is_leaf=lambda x: isinstance(x, P))
    return region(*args)

  jax.eval_shape(typed, *args)
  return found["updates"], found["state"]


PER_WORKER_ARGS = ("value", "alive", "prev_grads")


def _traced_extra(names: Sequence[str], params: Any,
                  num_workers: int) -> tuple:
  """Abstract extra arguments for the state trace: those in ``names`` per
  worker, and a shared ``value=`` when it is not one of them."""
  stacked = lambda shape, dtype: jax.ShapeDtypeStruct((num_workers,) + shape,
                                                      dtype)
  kinds = {"value": lambda: stacked((), jnp.float32),
           "alive": lambda: stacked((), jnp.bool_),
           "prev_grads": lambda: jax.tree.map(
               lambda p: stacked(tuple(p.shape), p.dtype), params)}
  shared = {} if "value" in names else {
      "value": jax.ShapeDtypeStruct((), jnp.float32)}
  return {name: kinds[name]() for name in names}, shared


def state_layout(inner: optax.GradientTransformationExtraArgs,
                 params: Any, mesh: Any, axis_name: Hashable,
                 per_worker_args: Sequence[str] = ("value",)) -> _Layout:
  """Which parameters and leaves of ``inner.init(params)`` are FSDP shards,
  and which state leaves differ between workers.

  A state leaf that ``init`` shards over the worker axis (made from an FSDP
  parameter) is an FSDP shard; of the others, the per-worker ones are the
  fixed point of tracing one update, with the extra arguments named in
  ``per_worker_args`` given per worker, from a state whose per-worker leaves
  are those found so far.

  Raises:
    ValueError: if the updates still differ between workers, or are not
      shaped like the parameters (their shards).
  """
  fsdp = _sharding.worker_sharded(params, axis_name, "parameter")
  params = jax.tree.map(
      lambda x, f: jax.ShapeDtypeStruct(
          jnp.shape(x), x.dtype,
          sharding=NamedSharding(mesh, P(axis_name)) if f else None),
      params, fsdp)
  state = jax.eval_shape(inner.init, params)
  layout = _Layout(fsdp, _sharding.worker_sharded(state, axis_name, "state"),
                   jax.tree.map(lambda _: False, state))
  extra = _traced_extra(per_worker_args, params, mesh.shape[axis_name])
  while True:
    updates_vary, state_vary = _trace_step(inner, mesh, axis_name, params,
                                           state, layout, extra)
    _check_agreed(updates_vary, axis_name)
    mask = jax.tree.map(lambda a, b: a or b, layout.mask, state_vary)
    if mask == layout.mask:
      return layout
    layout = layout._replace(mask=mask)


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
    stacked = jnp.broadcast_to(x[None], (num_workers,) + x.shape)
    known = _sharding.named_sharding(x) is not None
    # Dims of unknown layout (Auto axes inside jit) stay the compiler's.
    rest = [e if known else P.UNCONSTRAINED for e in _sharding.spec_of(x)]
    sharding = NamedSharding(mesh, P(axis_name, *rest))
    if isinstance(x, jax.core.Tracer):
      if all(t == _EXPLICIT for t in mesh.axis_types):
        return jax.sharding.reshard(stacked, sharding)
      return jax.lax.with_sharding_constraint(stacked, sharding)
    return jax.device_put(stacked, sharding)

  return jax.tree.map(place, state, mask)


def _split_extra(extra_args: Dict[str, Any], num_workers: int) -> Any:
  """Extra arguments with a leading axis of size N are split per worker."""
  return jax.tree.map(lambda x: bool(jnp.ndim(x)) and
                      jnp.shape(x)[0] == num_workers, extra_args)


def data_parallel(
    inner: optax.GradientTransformation, axis_name: Hashable, *,
    mesh: Optional[Any] = None,
    per_worker_args: Sequence[str] = ("value",),
) -> optax.GradientTransformationExtraArgs:
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
    per_worker_args: the extra arguments that will be passed per worker, out
      of ``"value"``, ``"alive"`` and ``"prev_grads"``: the state trace gives
      them per worker, so state they feed is stored per worker. Pass ``()``
      for an inner transformation that needs one shared ``value=`` (e.g.
      ``optax.contrib.reduce_on_plateau``) and give it the mean loss.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` for ``nnx.Optimizer`` and
    ``optax.apply_updates``. Its updates are shaped like the parameters, not
    like its stacked input, so wrap ``inner`` (not the result) in optax
    wrappers that keep gradient-shaped state or branch on the updates
    (``optax.MultiSteps``, ``optax.apply_if_finite``).

  Raises:
    ValueError: at ``init`` or trace time, if ``inner``'s updates still differ
      between the workers (no aggregator over ``axis_name`` in it), are not
      shaped like the parameters (their shards under FSDP), if parameters
      are sharded over ``axis_name`` other than along their leading
      dimension of an Explicit axis, or if extra arguments make a shared
      state leaf per worker.

  Example:
    >>> tx = data_parallel(optax.chain(majority_vote("data"),
    ...                                optax.scale_by_learning_rate(1e-3)),
    ...                    "data")
  """
  _sharding.check_axis_name(axis_name)
  for name in per_worker_args:
    _checks.check_choice("per_worker_args entries", name, PER_WORKER_ARGS)
  per_worker_args = tuple(per_worker_args)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    found = _sharding.find_mesh(mesh, params, axis_name)
    layout = state_layout(inner, params, found, axis_name, per_worker_args)
    return _place(inner.init(params), layout.mask, found, axis_name)

  def update_fn(updates, state, params=None, **extra_args):
    found = _sharding.find_mesh(mesh, (updates, params), axis_name)
    like = (params if params is not None
            else _one_worker_shapes(updates))
    layout = state_layout(inner, like, found, axis_name, per_worker_args)
    return _run(inner, found, axis_name, layout, updates, state, params,
                extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _run(inner, mesh, axis_name, layout, updates, state, params, extra_args):
  """The ``shard_map`` of one update, manual over the workers' axis only."""
  mask = layout.mask
  split = _split_extra(extra_args, mesh.shape[axis_name])
  every = lambda tree, flag: jax.tree.map(lambda _: flag, tree)
  trees, stacked = ((updates, state, params, extra_args),
                    (every(updates, True), mask, every(params, False), split))
  trees = jax.tree.map(lambda x, s: _on_worker_axis(x, axis_name) if s else x,
                       trees, stacked)
  free = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
               if t == _EXPLICIT and a != axis_name)
  # The leaves' layouts over the other axes, as one worker sees them.
  local = jax.tree.map(lambda x, s: P(*_sharding.without_axis(
      _sharding.spec_of(x)[int(s):], axis_name)), trees, stacked)

  def body(updates, state, params, extra_args):
    state = jax.tree.map(lambda x, m: x[0] if m else x, state, mask)
    extra_args = jax.tree.map(lambda x, s: x[0] if s else x, extra_args, split)
    update = lambda u, s, p, e: inner.update(u, s, p, **e)
    if free:  # back to Explicit types inside (see below)
      update = jax.sharding.explicit_axes(update, axes=free,
                                          in_sharding=local)
    new_updates, new_state = update(_drop_first(updates), state, params,
                                    extra_args)
    _check_shapes(new_updates, params, layout.params)
    _check_agreed(_varies_unless(new_updates, axis_name, layout.params),
                  axis_name)
    _check_shared(_varies_unless(new_state, axis_name, mask, layout.state),
                  axis_name)
    return new_updates, jax.tree.map(lambda x, m: x[None] if m else x,
                                     new_state, mask)

  state_specs = layout.state_specs(axis_name)
  update_specs = _sharding.split_specs(layout.params, axis_name)
  region = jax.shard_map(
      body, mesh=_sharding.with_auto(mesh, free), axis_names={axis_name},
      in_specs=(P(axis_name), state_specs,
                P() if params is None else update_specs,
                _sharding.split_specs(split, axis_name)),
      out_specs=(update_specs, state_specs))
  if not free:
    return region(*trees)
  # JAX lowers a region manual over some axes with its other Explicit axes
  # replicated at the boundary (an all-gather of every sharded leaf); made
  # Auto there and Explicit again inside, the leaves stay sharded.
  named = lambda p: NamedSharding(mesh, p)
  update_out = local[0] if params is None else jax.tree.map(  # FSDP: shards
      lambda spec, p, f: P(*_sharding.spec_of(p)) if f else spec,
      local[0], params, layout.params, is_leaf=lambda x: isinstance(x, P))
  out = (jax.tree.map(named, update_out, is_leaf=lambda x: isinstance(x, P)),
         jax.tree.map(lambda x: named(P(*_sharding.spec_of(x))), trees[1]))
  return jax.sharding.auto_axes(region, axes=free, out_sharding=out)(*trees)


def _on_worker_axis(x: Any, axis_name: Hashable) -> Any:
  """``x`` with its leading axis sharded over the workers (on Explicit
  meshes a replicated ``alive=`` mask must be resharded first)."""
  x = jnp.asarray(x)
  entries = _sharding.spec_of(x)
  explicit = _sharding.named_sharding(x)
  if (explicit is None or entries[0] == axis_name or not any(
      t == _EXPLICIT for t in explicit.mesh.axis_types)):
    return x
  return jax.sharding.reshard(x, P(axis_name, *entries[1:]))


def _check_shared(changed: Any, axis_name: Hashable) -> None:
  path = _first_changed_path(changed)
  if path is not None:
    raise ValueError(
        f"the state leaf {path} is shared by the workers of {axis_name!r} "
        "after init but differs between them with these extra arguments: "
        "pass per-worker extra arguments only where the transformation "
        "averages them over the workers")
