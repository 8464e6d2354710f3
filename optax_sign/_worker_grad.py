r"""Per-worker losses and gradients inside a plain ``jax.jit`` / ``nnx.jit`` step.

A GSPMD-partitioned ``jax.grad`` never materialises each worker's own
gradient: the compiler sums it in float32 across the data axis. Sign
compression needs the per-worker gradients, so :func:`worker_value_and_grad`
computes them in a ``jax.shard_map`` that is manual over the worker axis only
(``axis_names={axis_name}``): the other mesh axes (``"model"``, ``"fsdp"``)
stay with the compiler, so tensor-parallel models run as in the rest of the
step. The results come back *stacked*: a leading axis of size :math:`N`,
sharded over the worker axis, so each device keeps only its own worker's
gradient (the memory of one gradient). Feed them to an optimizer wrapped by
:func:`optax_sign.data_parallel`.
"""

import functools
import sys
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_sign import _communication
from optax_sign import _sharding


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
  ``nnx.Param`` leaves are differentiated) are held whole by every worker or,
  on an Explicit worker axis, sharded along their leading dimension over
  ``axis_name`` (FSDP): such a leaf is all-gathered inside and each worker's
  gradient is taken with respect to the whole leaf, so its gradient has the
  leaf's full shape. Every other argument is split over the workers along its
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
    is written back the same on every worker: batch statistics averaged over
    the workers, RNG counters from worker 0. Each worker draws from its own
    RNG streams (the module's keys folded with the worker index).

  Example:
    >>> mesh = jax.make_mesh((4,), ("data",))
    >>> batch = jax.device_put(batch, jax.NamedSharding(mesh, P("data")))
    >>> grads_fn = worker_value_and_grad(loss_fn, "data")
    >>> loss, grads = grads_fn(params, batch)   # loss: [N]; grads: [N, ...]
    >>> loss.shape, jax.tree.map(jnp.shape, grads)
    ((4,), {'b': (4, 2), 'w': (4, 3, 2)})
  """
  _sharding.check_axis_name(axis_name)
  single = isinstance(argnums, int)
  argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

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
  mesh = _sharding.find_mesh(mesh, args, axis_name)
  fsdp = {i: _sharding.worker_sharded(args[i], axis_name, f"argument {i}, leaf")
          for i in argnums}
  if dict(zip(mesh.axis_names, mesh.axis_types))[axis_name] == (
      jax.sharding.AxisType.Explicit):
    args = tuple(a if i in argnums or i in whole else jax.tree.map(
        lambda x: _split_over(x, mesh, axis_name), a)
                 for i, a in enumerate(args))
  split = lambda x: P(axis_name) if jnp.ndim(x) else P()
  specs = tuple(
      _sharding.split_specs(fsdp[i], axis_name) if i in argnums
      else jax.tree.map(lambda _: P(), a) if i in whole
      else jax.tree.map(split, a) for i, a in enumerate(args))

  def body(*local):  # batch leaves and FSDP shards arrive as this worker's
    local = list(local)
    for i in argnums:  # FSDP: each worker differentiates the gathered leaf
      local[i] = _communication.per_worker(jax.tree.map(
          lambda x, sharded: jax.lax.all_gather(
              x, axis_name, axis=0, tiled=True) if sharded else x,
          local[i], fsdp[i]), axis_name)
    diff = argnums[0] if single else argnums
    out, grads = jax.value_and_grad(fun, diff, has_aux=has_aux)(*local)
    return _sharding.stack(out), _sharding.stack(grads)

  explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
                   if t == jax.sharding.AxisType.Explicit and a != axis_name)
  region = jax.shard_map(body, mesh=_sharding.with_auto(mesh, explicit), in_specs=specs,
                         out_specs=P(axis_name), axis_names={axis_name})
  if not explicit:
    return region(*args)
  # JAX lowers a partly manual region with its other Explicit axes closed
  # (replicated): a tensor-parallel model would be all-gathered. Made Auto
  # over them, the compiler keeps the parameters sharded inside; the
  # gradients come out sharded like the parameters.
  diff = args[argnums[0]] if single else tuple(args[i] for i in argnums)
  stacked = lambda spec: NamedSharding(mesh, P(axis_name, *spec))
  grads_sharding = jax.tree.map(lambda x: stacked(_sharding.without_axis(
      _sharding.spec_of(x), axis_name)), diff)
  return jax.sharding.auto_axes(
      region, axes=explicit,
      out_sharding=(stacked(()), grads_sharding))(*args)


def _split_over(x: Any, mesh: Any, axis_name: Any) -> Any:
  """A batch leaf laid out ``P(axis_name, ...)`` over an Explicit worker axis
  (a replicated batch is sliced where it lies; shard_map would refuse it)."""
  spec = _sharding.spec_of(x)
  if not jnp.ndim(x) or spec[0] == axis_name:
    return x
  rest = tuple(None if e == axis_name else e for e in spec[1:])
  return jax.sharding.reshard(x, NamedSharding(mesh, P(axis_name, *rest)))


def _module_value_and_grad(fun, axis_name, argnums, single, has_aux, mesh,
                           modules, args):
  """:func:`worker_value_and_grad` when some differentiated arguments are NNX
  modules: differentiates their ``nnx.Param`` state; their other state goes in
  whole as arrays and comes back shared (:func:`_shared`)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  pure, graphdefs, rest_at = list(args), {}, {}
  for i, module in modules.items():
    graphdefs[i], pure[i], rest = nnx.split(module, nnx.Param, ...)
    rest_at[i] = len(pure)
    pure.append(nnx.as_pure(rest))

  def pure_fun(*xs):
    xs = list(xs)
    for i, graphdef in graphdefs.items():
      xs[i] = nnx.merge(graphdef, xs[i], _worker_keys(xs[rest_at[i]],
                                                      axis_name))
    out = fun(*xs[:len(args)])
    value, aux = out if has_aux else (out, None)
    rests = {}
    for i in graphdefs:  # the keys go back as they came, counters advanced
      rest = jax.tree.map(lambda new, old: old if _is_key(old) else new,
                          nnx.as_pure(nnx.state(xs[i], nnx.Not(nnx.Param))),
                          xs[rest_at[i]])
      rests[i] = jax.tree.map(
          functools.partial(_shared, axis_name=axis_name), rest)
    return value, (aux, rests)

  (value, (aux, rests)), grads = _value_and_grad(
      pure_fun, axis_name, argnums, single, True, mesh, pure,
      whole=tuple(rest_at.values()))
  for i, rest in rests.items():
    nnx.update(modules[i], jax.tree.map(_first_copy, rest))
  return ((value, aux) if has_aux else value), grads


def _is_key(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


def _worker_keys(state: Any, axis_name: Hashable) -> Any:
  """PRNG keys of module state folded with the worker index, so workers draw
  independent dropout masks (as separate data-parallel processes would)."""
  index = jax.lax.axis_index(axis_name)
  return jax.tree.map(
      lambda x: jax.random.fold_in(x, index) if _is_key(x) else x, state)


def _shared(x: jax.Array, axis_name: Hashable) -> jax.Array:
  """Module state other than parameters, made the same on every worker:
  floating values that differ (batch statistics) are averaged over the
  workers, integers (RNG counters) taken from worker 0."""
  if axis_name not in _communication.varying_axes(x):
    return x
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jax.lax.pmean(x, axis_name)
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    first = jax.lax.axis_index(axis_name) == 0
    return jax.lax.psum(jnp.where(first, x, jnp.zeros_like(x)),
                        axis_name).astype(x.dtype)
  raise ValueError(f"module state of dtype {x.dtype} differs between the "
                   f"workers of {axis_name!r} and cannot be carried back")


def _first_copy(x: jax.Array) -> jax.Array:
  """Worker 0's copy of a stacked leaf whose copies are all equal."""
  sharding = _sharding.named_sharding(x)
  if sharding is not None and any(
      t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types):
    x = jax.sharding.reshard(x, P())
  return x[0]


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
