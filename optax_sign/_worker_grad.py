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

import sys
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
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
  _sharding.check_axis_name(axis_name)
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
  mesh = _sharding.find_mesh(mesh, args, axis_name)
  for i in argnums:
    _sharding.check_replicated(args[i], axis_name, f"argument {i}, leaf")
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
    return _sharding.stack(out), _sharding.stack(grads)

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
