r"""Compressed data parallelism inside a plain ``jax.jit`` / ``nnx.jit`` step.

Sign compression needs each worker's own gradient, which a GSPMD-partitioned
``jax.grad`` never materialises (the compiler sums it in float32). Two calls
give it without writing ``shard_map`` or specs:

* :func:`worker_value_and_grad` (and :func:`worker_grad`) computes, for each of
  the :math:`N` workers of a mesh axis, the loss and gradient on that worker's
  slice of the batch. They come back *stacked*: a leading axis of size
  :math:`N`, sharded over the worker axis, so each device keeps only its own
  worker's gradient (the memory of one gradient).
* :func:`data_parallel` wraps any transformation of this library (a chain with
  :func:`~optax_sign.majority_vote`, :func:`~optax_sign.mean_of_signs`,
  multi-worker ALIAS, error feedback, local steps...) so that its ``update``
  takes those stacked gradients, runs per worker and returns the one update
  all workers agreed on, shaped like the parameters.

Both run a ``jax.shard_map`` that is manual over the worker axis only
(``axis_names={axis_name}``): the other mesh axes (``"model"``, ``"fsdp"``)
stay with the compiler, so tensor-parallel models and whole-model statistics
(norms, inner products) work as in the rest of the jitted step.

The convention for every per-worker value: **a leading axis of size N**. The
optimizer state carries one too (every device holds its own worker's state,
the same memory as a replicated state), and extra arguments of ``update``
with a leading axis of size :math:`N` (``value=`` from
:func:`worker_value_and_grad`, a per-worker ``alive=`` mask) are split over the
workers; others are passed whole to every worker.
"""

import sys
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from optax_sign import _communication


def _find_mesh(mesh: Any, trees: Sequence[Any], axis_name: Hashable) -> Any:
  """``mesh``, else the context mesh, else the mesh of the first sharded leaf.

  Raises:
    ValueError: if no mesh is found or it has no axis ``axis_name``.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    for leaf in jax.tree.leaves(trees):
      sharding = getattr(leaf, "sharding", None)
      if not isinstance(sharding, NamedSharding):
        sharding = jax.typeof(leaf).sharding
      if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
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


def _check_axis_name(axis_name: Any) -> None:
  if isinstance(axis_name, (tuple, list)) or axis_name is None:
    raise ValueError(f"axis_name must name one mesh axis; got {axis_name!r}")


def _spec(leaf: Any) -> tuple:
  """The explicit ``PartitionSpec`` entries of ``leaf`` (``()`` if unknown)."""
  sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    sharding = jax.typeof(leaf).sharding
  return tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()


def _uses(entry: Any, axis_name: Hashable) -> bool:
  return entry == axis_name or (isinstance(entry, tuple) and axis_name in entry)


def _check_replicated(tree: Any, axis_name: Hashable, what: str) -> None:
  """Raises if a leaf of ``tree`` is sharded over the worker axis."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if any(_uses(e, axis_name) for e in _spec(leaf)):
      raise ValueError(
          f"{what} {jax.tree_util.keystr(path)} is sharded over the worker "
          f"axis {axis_name!r} (FSDP over the voted axis): every worker must "
          "hold the whole leaf on that axis. Shard it over another mesh axis "
          "(for example 'fsdp' or 'model') instead.")


def _split_spec(axis_name: Hashable, num_workers: int) -> Callable[[Any], P]:
  """In-spec of a per-worker leaf: split its leading axis of size N."""

  def spec(leaf):
    shape = jnp.shape(leaf)
    return P(axis_name) if shape and shape[0] == num_workers else P()

  return spec


def _stack(tree: Any) -> Any:
  return jax.tree.map(lambda x: x[None], tree)


def _unstack(tree: Any, specs: Any = None) -> Any:
  """Drops the leading worker axis of the local block of each split leaf
  (every leaf when ``specs`` is None)."""
  if specs is None:
    return jax.tree.map(lambda x: x[0], tree)
  return jax.tree.map(lambda x, s: x[0] if s != P() else x, tree, specs,
                      is_leaf=lambda s: isinstance(s, P))


def _is_nnx_module(x: Any) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Module)


def worker_value_and_grad(
    fun: Callable[..., Any], axis_name: Hashable, *,
    argnums: Union[int, Sequence[int]] = 0, has_aux: bool = False,
    mesh: Optional[Any] = None) -> Callable[..., Any]:
  r"""Like ``jax.value_and_grad``, once per worker of the mesh axis ``axis_name``.

  For workers :math:`i = 1..N`, with :math:`B_i` the :math:`i`-th slice of the
  batch along its leading axis,

  .. math::
    f_i = \mathrm{fun}(x, B_i),\qquad g_i = \nabla_x\, \mathrm{fun}(x, B_i),

  returned stacked: ``value`` of shape ``[N]`` and every gradient leaf of
  shape ``[N, *x.shape]``, sharded over ``axis_name`` (and over the other axes
  like ``x``). Nothing is summed across workers: feed the gradients to a
  :func:`data_parallel` optimizer, which exchanges only compressed signs.

  Arguments in ``argnums`` (parameters, or a ``flax.nnx.Module`` whose
  ``nnx.Param`` leaves are differentiated) must not be sharded over
  ``axis_name``; every other argument is split over the workers along its
  leading axis (0-d leaves are seen whole by every worker). Call it inside
  ``jax.jit`` or ``nnx.jit``, or eagerly.

  Args:
    fun: the loss, ``fun(params, *batch) -> scalar`` (or ``(scalar, aux)``).
    axis_name: the mesh axis of the workers (one name).
    argnums: the argument(s) to differentiate.
    has_aux: whether ``fun`` returns ``(value, aux)``; ``aux`` is stacked too.
    mesh: the mesh; defaults to the one set by ``jax.set_mesh`` or, failing
      that, the mesh of the first argument placed with a ``NamedSharding``.

  Returns:
    A function with ``fun``'s arguments returning ``(value, grads)`` or, with
    ``has_aux``, ``((value, aux), grads)``; for an ``nnx.Module`` the
    gradients are an ``nnx.State`` of its parameters, as ``nnx.grad`` gives.
    State that ``fun`` changes in an ``nnx.Module`` other than its parameters
    (RNG counters, batch statistics) is carried back from worker 0.

  Example:
    >>> grads_fn = worker_value_and_grad(loss_fn, "data")
    >>> loss, grads = grads_fn(params, batch)   # loss: [N]; grads: [N, ...]
  """
  _check_axis_name(axis_name)
  single = isinstance(argnums, int)
  argnums = (argnums,) if single else tuple(argnums)

  def wrapped(*args):
    modules = {i: args[i] for i in argnums if _is_nnx_module(args[i])}
    if modules:
      return _module_value_and_grad(fun, axis_name, argnums, single, has_aux,
                                    mesh, modules, args)
    return _value_and_grad(fun, axis_name, argnums, single, has_aux, mesh,
                           args)

  return wrapped


def _value_and_grad(fun, axis_name, argnums, single, has_aux, mesh, args,
                    whole=()):
  """:func:`worker_value_and_grad` for arguments that are pytrees of arrays;
  arguments in ``whole`` are neither differentiated nor split."""
  mesh = _find_mesh(mesh, args, axis_name)
  for i in argnums:
    _check_replicated(args[i], axis_name, f"argument {i}, leaf")
  split = lambda x: P(axis_name) if jnp.ndim(x) else P()
  specs = tuple(
      jax.tree.map(lambda _: P(), a) if i in argnums or i in whole
      else jax.tree.map(split, a) for i, a in enumerate(args))

  def body(*local):  # batch leaves arrive as this worker's slice
    local = list(local)
    for i in argnums:
      local[i] = _communication.per_worker(local[i], axis_name)
    diff = argnums[0] if single else argnums
    out, grads = jax.value_and_grad(fun, diff, has_aux=has_aux)(*local)
    return _stack(out), _stack(grads)

  return jax.shard_map(body, mesh=mesh, in_specs=specs,
                       out_specs=P(axis_name), axis_names={axis_name})(*args)


def _module_value_and_grad(fun, axis_name, argnums, single, has_aux, mesh,
                           modules, args):
  """:func:`worker_value_and_grad` when some differentiated arguments are NNX
  modules: differentiates their ``nnx.Param`` state; their other state goes in
  whole and is written back from worker 0."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  pure, graphdefs, rest_at = list(args), {}, {}
  for i, module in modules.items():
    graphdefs[i], pure[i], rest = nnx.split(module, nnx.Param, ...)
    rest_at[i] = len(pure)
    pure.append(rest)

  def pure_fun(*xs):
    xs = list(xs)
    for i, graphdef in graphdefs.items():
      xs[i] = nnx.merge(graphdef, xs[i], xs[rest_at[i]])
    out = fun(*xs[:len(args)])
    value, aux = out if has_aux else (out, None)
    rests = {i: nnx.state(xs[i], nnx.Not(nnx.Param)) for i in graphdefs}
    return value, (aux, rests)

  (value, (aux, rests)), grads = _value_and_grad(
      pure_fun, axis_name, argnums, single, True, mesh, pure,
      whole=tuple(rest_at.values()))
  for i, rest in rests.items():
    nnx.update(modules[i], jax.tree.map(lambda x: x[0], rest))
  return ((value, aux) if has_aux else value), grads


def worker_grad(fun: Callable[..., Any], axis_name: Hashable, *,
                argnums: Union[int, Sequence[int]] = 0, has_aux: bool = False,
                mesh: Optional[Any] = None) -> Callable[..., Any]:
  """Like ``jax.grad``, once per worker: :func:`worker_value_and_grad`'s
  gradients (and ``aux`` with ``has_aux``), stacked over the workers."""
  value_and_grad = worker_value_and_grad(fun, axis_name, argnums=argnums,
                                         has_aux=has_aux, mesh=mesh)

  def wrapped(*args):
    out, grads = value_and_grad(*args)
    return (grads, out[1]) if has_aux else grads

  return wrapped


def _place(tree: Any, mesh: Any, axis_name: Hashable, num_workers: int) -> Any:
  """Each leaf repeated N times along a new leading axis sharded over the
  workers, its other axes sharded as before."""

  def place(x):
    x = jnp.asarray(x)
    spec = P(axis_name, *_spec(x))
    stacked = jnp.broadcast_to(x[None], (num_workers,) + x.shape)
    if isinstance(mesh, jax.sharding.AbstractMesh):
      return jax.sharding.reshard(stacked, spec)
    return jax.device_put(stacked, NamedSharding(mesh, spec))

  return jax.tree.map(place, tree)


def data_parallel(
    inner: optax.GradientTransformation, axis_name: Hashable, *,
    mesh: Optional[Any] = None) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` once per worker on stacked per-worker gradients.

  ``update(grads, state, params)`` takes the output of
  :func:`worker_value_and_grad` (leaves ``[N, *p.shape]``), gives worker
  :math:`i` its own :math:`g_i` and state, runs ``inner.update`` inside a
  ``jax.shard_map`` manual over ``axis_name`` only, and returns the update,
  which must be the same on every worker (``inner`` aggregates, for example
  with :func:`~optax_sign.majority_vote`), shaped like the parameters:

  .. math::
    u = \mathrm{inner}(g_1, \ldots, g_N), \qquad
    s_i' = \mathrm{inner.state}_i .

  The state has a leading worker axis (each device keeps its own worker's
  state, the memory of a replicated one): checkpoint it whole, so per-worker
  parts (error-feedback residuals) resume exactly.

  Args:
    inner: a transformation that communicates over ``axis_name``.
    axis_name: the mesh axis of the workers (one name).
    mesh: the mesh; defaults to the one set by ``jax.set_mesh`` or the mesh
      of the first leaf placed with a ``NamedSharding``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` for ``nnx.Optimizer``,
    ``optax.apply_updates`` and ``optax`` wrappers.

  Raises:
    ValueError: at trace time, if ``inner``'s updates still differ between
      the workers (no aggregator over ``axis_name`` in it), or if parameters
      are sharded over ``axis_name``.

  Example:
    >>> tx = data_parallel(optax.chain(majority_vote("data"),
    ...                                optax.scale_by_learning_rate(1e-3)),
    ...                    "data")
  """
  _check_axis_name(axis_name)

  def init_fn(params):
    found = _find_mesh(mesh, params, axis_name)
    _check_replicated(params, axis_name, "parameter")
    return _place(inner.init(params), found, axis_name,
                  found.shape[axis_name])

  def update_fn(updates, state, params=None, **extra_args):
    found = _find_mesh(mesh, (updates, params), axis_name)
    _check_replicated(params, axis_name, "parameter")
    extra_specs = jax.tree.map(
        _split_spec(axis_name, found.shape[axis_name]), extra_args)

    def run(updates, state, params, extra_args, *, check):
      def body(updates, state, params, extra_args):
        updates = _unstack(updates)
        state = state if check else _unstack(state)
        extra_args = _unstack(extra_args, extra_specs)
        new_updates, new_state = _on_auto_axes(
            lambda u, s, p, e: inner.update(u, s, p, **e), updates, state)(
                updates, state, params, extra_args)
        if check:
          _check_agreed(new_updates, axis_name)
        return new_updates, _stack(new_state)

      return jax.shard_map(
          body, mesh=found, axis_names={axis_name}, check_vma=check,
          in_specs=(P(axis_name), P() if check else P(axis_name), P(),
                    extra_specs),
          out_specs=(P() if check else P(), P(axis_name)))(
              updates, state, params, extra_args)

    # Every state leaf is stored per worker, so all arrive typed "varying";
    # the check traces (without running) one step from a shared state, where
    # the type system proves that the updates agree across the workers.
    jax.eval_shape(lambda *a: run(*a, check=True), updates,
                   jax.tree.map(_one_worker, state), params, extra_args)
    return run(updates, state, params, extra_args, check=False)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _one_worker(x: Any) -> jax.ShapeDtypeStruct:
  """The abstract value of one worker's block of a stacked leaf."""
  sharding = jax.typeof(x).sharding
  if isinstance(sharding, NamedSharding) and any(
      t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types):
    sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
  else:
    sharding = None
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def _on_auto_axes(update: Callable[..., Any], updates: Any,
                  state: Any) -> Callable[..., Any]:
  """``update`` with the Explicit mesh axes left in the body made Auto.

  The library's transformations flatten and concatenate leaves, which an
  Explicit axis only allows for some layouts; under Auto the compiler
  partitions them. The outputs keep the inputs' shardings (updates like the
  gradients, the state as it came in).
  """
  mesh = jax.sharding.get_abstract_mesh()
  explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
                   if t == jax.sharding.AxisType.Explicit)
  if not explicit:
    return update
  spec = lambda x: jax.typeof(x).sharding.spec
  out = (jax.tree.map(spec, updates), jax.tree.map(spec, state))
  return jax.sharding.auto_axes(update, axes=explicit, out_sharding=out)


def _check_agreed(updates: Any, axis_name: Hashable) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
    if axis_name in _communication.varying_axes(leaf):
      raise ValueError(
          f"the update {jax.tree_util.keystr(path)} still differs between the "
          f"workers of {axis_name!r}: data_parallel needs a transformation "
          "that aggregates over that axis (majority_vote, mean_of_signs, "
          "scale_by_error_feedback_sign(axis_name=...), alias_sign_sgd("
          "axis_name=...)). Local steps keep per-worker parameters and do "
          "not fit here: run them under shard_map or vmap.")
